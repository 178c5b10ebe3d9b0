"""Topic names and who may publish or subscribe where.

Default policy: a user may publish and subscribe on ``NAME`` and ``NAME/…``; admins anywhere;
any other topic only through ``[[acl]]`` rules. Rules only grant; they never take away the
defaults. The first rule whose pattern matches the topic decides for that action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from drainbus.errors import PermissionDenied, UsageError
from drainbus.identity import Identity, user_key

if TYPE_CHECKING:  # a name only: drainbus.config's hooks settings check topic names here
    from drainbus.config import AclRule

__all__ = ["TOPIC_RULE", "Access", "check_topic_name", "glob_to_regex"]

TOPIC_RULE = (
    "use 1-128 letters, digits, '.', '_' and '-', with '/' between segments "
    "(no leading, trailing or double '/', no '..')"
)
_TOPIC = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")

Action = Literal["publish", "subscribe"]


def check_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a valid name, else raise UsageError stating the rule."""
    if not (1 <= len(topic) <= 128) or not _TOPIC.fullmatch(topic) or ".." in topic:
        # Codec names ignore case: a mutant spelling it "UNICODE_ESCAPE" is the same codec.
        shown = topic if topic.isprintable() else topic.encode("unicode_escape").decode()
        raise UsageError(f"topic '{shown}' is invalid: {TOPIC_RULE}", topic=topic)
    return topic


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a topic glob: ``*`` matches within one segment, ``**`` across segments."""
    parts = re.split(r"(\*\*|\*)", pattern)
    body = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(f"^{body}\\Z")  # \Z: "$" would also match before a final newline


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    patterns: tuple[re.Pattern[str], ...]
    publish: frozenset[str]
    subscribe: frozenset[str]

    def matches(self, topic: str) -> bool:
        return any(p.match(topic) for p in self.patterns)


class Access:
    """Answers "may this identity publish/subscribe on this topic?" from the config."""

    def __init__(self, rules: tuple[AclRule, ...]) -> None:
        self._rules = tuple(
            _CompiledRule(
                patterns=tuple(glob_to_regex(p) for p in rule.topics),
                # "*" and "@admins" are their own user_key: casefold leaves them as they are.
                publish=frozenset(user_key(p) for p in rule.publish),
                subscribe=frozenset(user_key(p) for p in rule.subscribe),
            )
            for rule in rules
        )

    def allows(self, identity: Identity, action: Action, topic: str) -> bool:
        """True if ``identity`` may perform ``action`` on ``topic``."""
        # Names compare regardless of case, as everywhere (user names are unique that way).
        user = user_key(identity.user)
        owner = user_key(topic.partition("/")[0])
        if identity.is_admin or owner == user:
            return True
        for rule in self._rules:
            if rule.matches(topic):
                allowed = rule.publish if action == "publish" else rule.subscribe
                # "@admins" needs no test here: admins were let through above.
                return "*" in allowed or user in allowed
        return False

    def require(self, identity: Identity, action: Action, topic: str) -> None:
        """Raise PermissionDenied unless :meth:`allows`."""
        if not self.allows(identity, action, topic):
            raise PermissionDenied(
                f"user '{identity.user}' may not {action} on topic '{topic}' "
                f"(own topics are '{identity.user}/…'; others need an [[acl]] rule)",
                topic=topic,
                user=identity.user,
            )
