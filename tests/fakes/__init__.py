"""Stand-ins for services tests cannot reach: small local servers, never client patches."""

from tests.fakes.cloudflare_api import FakeCloudflare, Received

__all__ = ["FakeCloudflare", "Received"]
