"""The Cloudflare-compatible purge endpoint: ``POST /client/v4/zones/{zone}/purge_cache``."""
