"""Topic names, topic globs, and who may publish or subscribe where."""

from __future__ import annotations

import pytest

from drainbus.acl import TOPIC_RULE, Access, Action, check_topic_name, glob_to_regex
from drainbus.config import AclRule
from drainbus.errors import ExitCode, PermissionDenied, UsageError
from drainbus.identity import Identity

BOTH: list[Action] = ["publish", "subscribe"]


def who(user: str, *, admin: bool = False) -> Identity:
    """An authenticated identity; the fingerprint plays no part in access decisions."""
    return Identity(user=user, fingerprint="SHA256:unused", is_admin=admin)


# --- topic names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("cache-drain", id="dash"),
        pytest.param("alice/deploys", id="two-segments"),
        pytest.param("a.b_c-d/e", id="every-punctuation"),
        pytest.param("x", id="one-char"),
        pytest.param("A9/b8/C7", id="digits-and-case"),
        pytest.param("a" * 128, id="128-chars"),
    ],
)
def test_valid_topic_names(topic: str) -> None:
    """Letters, digits, '.', '_', '-' in '/'-separated segments, up to 128 chars, are accepted."""
    assert check_topic_name(topic) == topic


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 129, id="129-chars"),
        pytest.param("cache drain", id="space"),
        pytest.param("cache\tdrain", id="tab"),
        pytest.param("cache-drain\n", id="trailing-newline"),
        pytest.param("cache\x00drain", id="nul"),
        pytest.param("cache\x1b[2Jdrain", id="escape-sequence"),
        pytest.param("..", id="dot-dot"),
        pytest.param("alice/../bob", id="dot-dot-segment"),
        pytest.param("/alice", id="leading-slash"),
        pytest.param("alice/", id="trailing-slash"),
        pytest.param("alice//deploys", id="double-slash"),
        pytest.param("café", id="unicode-letter"),
        pytest.param("cache\u2013drain", id="unicode-dash"),
        pytest.param("alice/*", id="glob"),
    ],
)
def test_invalid_topic_names(topic: str) -> None:
    """Anything else is a UsageError (exit 64): one printable line with the topic and the rule."""
    with pytest.raises(UsageError) as caught:
        check_topic_name(topic)

    error = caught.value
    assert error.exit_code == ExitCode.USAGE
    assert error.topic == topic
    shown = topic if topic.isprintable() else topic.encode("unicode_escape").decode()
    assert str(error) == f"topic '{shown}' is invalid: {TOPIC_RULE}"
    assert str(error).isprintable()


# --- globs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        pytest.param("cache-drain", "cache-drain", True, id="literal"),
        pytest.param("cache-drain", "cache-drain/x", False, id="literal-is-whole-name"),
        pytest.param("a.b", "aXb", False, id="dot-is-literal"),
        pytest.param("deploys/*", "deploys/web", True, id="star-one-segment"),
        pytest.param("deploys/*", "deploys/web/eu", False, id="star-not-across-slash"),
        pytest.param("deploys/*", "deploys", False, id="star-needs-its-segment"),
        pytest.param("*/status", "web/status", True, id="star-first-segment"),
        pytest.param("*/status", "eu/web/status", False, id="star-first-not-across"),
        pytest.param("web-*", "web-eu", True, id="star-inside-segment"),
        pytest.param("deploys/**", "deploys/web/eu/1", True, id="double-star-across"),
        pytest.param("deploys/**", "deploysx/web", False, id="double-star-keeps-prefix"),
        pytest.param("**/status", "a/b/status", True, id="double-star-leading"),
        pytest.param("**", "any/topic/at/all", True, id="double-star-everything"),
        pytest.param("cache-drain", "cache-drain\n", False, id="no-trailing-newline"),
    ],
)
def test_glob_to_regex(pattern: str, topic: str, matches: bool) -> None:
    """'*' matches within one segment, '**' across segments, everything else literally."""
    assert bool(glob_to_regex(pattern).match(topic)) is matches


# --- the default policy ---------------------------------------------------------------------


@pytest.mark.parametrize("action", BOTH)
@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        pytest.param("alice", True, id="own-name"),
        pytest.param("alice/deploys", True, id="own-subtopic"),
        pytest.param("alice/deploys/eu", True, id="own-deep-subtopic"),
        pytest.param("alicex", False, id="longer-name"),
        pytest.param("alicex/deploys", False, id="longer-name-subtopic"),
        pytest.param("bob/alice", False, id="own-name-inside-other"),
        pytest.param("cache-drain", False, id="shared-topic"),
    ],
)
def test_users_own_their_name_and_subtopics(action: Action, topic: str, allowed: bool) -> None:
    """Without rules a user may use NAME and NAME/…, and nothing else."""
    assert Access(()).allows(who("alice"), action, topic) is allowed


@pytest.mark.parametrize("action", BOTH)
@pytest.mark.parametrize("topic", ["bob", "bob/deploys", "cache-drain", "a/b/c"])
def test_admins_may_use_any_topic(action: Action, topic: str) -> None:
    """Admins may publish and subscribe anywhere, without rules."""
    assert Access(()).allows(who("root", admin=True), action, topic)


# --- [[acl]] rules --------------------------------------------------------------------------

RULES = (
    AclRule(topics=("cache-drain",), publish=("deployer",), subscribe=("*",)),
    AclRule(topics=("teams/*/status",), publish=("bob",), subscribe=("carol", "@admins")),
    AclRule(topics=("public/**", "announce"), publish=("*",), subscribe=("*",)),
)


@pytest.mark.parametrize(
    ("user", "action", "topic", "allowed"),
    [
        pytest.param("deployer", "publish", "cache-drain", True, id="named-publisher"),
        pytest.param("alice", "publish", "cache-drain", False, id="unnamed-publisher"),
        pytest.param("alice", "subscribe", "cache-drain", True, id="star-subscriber"),
        pytest.param("bob", "publish", "teams/web/status", True, id="glob-publisher"),
        pytest.param("bob", "subscribe", "teams/web/status", False, id="publish-only"),
        pytest.param("carol", "subscribe", "teams/web/status", True, id="subscribe-only"),
        pytest.param("carol", "publish", "teams/web/status", False, id="not-publisher"),
        pytest.param("bob", "publish", "teams/web/eu/status", False, id="star-one-segment"),
        pytest.param("alice", "publish", "public/a/b", True, id="double-star-any-user"),
        pytest.param("alice", "subscribe", "announce", True, id="second-pattern"),
        pytest.param("alice", "subscribe", "private", False, id="no-rule-matches"),
    ],
)
def test_rules_grant_per_action(user: str, action: Action, topic: str, allowed: bool) -> None:
    """A rule grants publish and subscribe separately, to '*' or to named users."""
    assert Access(RULES).allows(who(user), action, topic) is allowed


def test_admins_principal_means_admins_only() -> None:
    """'@admins' in a rule grants no ordinary user; admins pass either way."""
    access = Access((AclRule(topics=("ops",), publish=("@admins",)),))

    assert access.allows(who("root", admin=True), "publish", "ops")
    assert not access.allows(who("alice"), "publish", "ops")


@pytest.mark.parametrize("action", BOTH)
def test_names_in_rules_match_whatever_their_case(action: Action) -> None:
    """A user named in a rule is that user however the rule or the key file spells the name."""
    access = Access((AclRule(topics=("ops",), publish=("Deployer",), subscribe=("Deployer",)),))

    assert access.allows(who("deployer"), action, "ops")
    assert access.allows(who("DEPLOYER"), action, "ops")
    assert not access.allows(who("deployer2"), action, "ops")


@pytest.mark.parametrize("action", BOTH)
def test_own_topics_match_whatever_their_case(action: Action) -> None:
    """'Alice/deploys' belongs to alice: a topic's first segment names its owner in any case."""
    assert Access(()).allows(who("alice"), action, "Alice/deploys")
    assert Access(()).allows(who("ALICE"), action, "alice")


@pytest.mark.parametrize(
    ("action", "allowed"),
    [
        pytest.param("subscribe", True, id="first-rule-grants"),
        pytest.param("publish", False, id="first-rule-denies-despite-later-grant"),
    ],
)
def test_first_matching_rule_decides(action: Action, allowed: bool) -> None:
    """Only the first rule whose pattern matches is consulted; later rules can't add to it."""
    access = Access(
        (
            AclRule(topics=("shared/**",), subscribe=("*",)),
            AclRule(topics=("shared/news",), publish=("*",), subscribe=("*",)),
        )
    )

    assert access.allows(who("alice"), action, "shared/news") is allowed


def test_rules_never_take_away_own_topics() -> None:
    """A rule granting nobody on a user's own topics leaves the user's default rights intact."""
    access = Access((AclRule(topics=("alice/**", "alice"), publish=(), subscribe=()),))

    for action in BOTH:
        assert access.allows(who("alice"), action, "alice")
        assert access.allows(who("alice"), action, "alice/deploys")
        assert not access.allows(who("bob"), action, "alice/deploys")


def test_require_passes_when_allowed() -> None:
    """require() returns quietly when the action is allowed."""
    Access(RULES).require(who("deployer"), "publish", "cache-drain")


def test_require_checks_the_action_it_is_given() -> None:
    """Where a rule lets everyone subscribe but one user publish, require() tells them apart."""
    Access(RULES).require(who("alice"), "subscribe", "cache-drain")
    with pytest.raises(PermissionDenied, match="may not publish on topic 'cache-drain'"):
        Access(RULES).require(who("alice"), "publish", "cache-drain")


def test_require_raises_permission_denied_naming_user_and_topic() -> None:
    """require() raises PermissionDenied (exit 77) carrying and naming the user and topic."""
    with pytest.raises(PermissionDenied) as caught:
        Access(RULES).require(who("bob"), "subscribe", "alice/deploys")

    error = caught.value
    assert error.exit_code == int(ExitCode.NOPERM) == 77
    assert (error.user, error.topic) == ("bob", "alice/deploys")
    assert str(error).startswith("user 'bob' may not subscribe on topic 'alice/deploys'")
