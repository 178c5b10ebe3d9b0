# drainbus purge endpoints for Varnish 7 with the xkey vmod (Debian: varnish-modules).
#
# Include it from your VCL after the backends and before your own subroutines, so that its
# vcl_recv runs first (Varnish concatenates subroutines of the same name in include order):
#
#     vcl 4.1;
#     backend default { .host = "127.0.0.1"; .port = "8080"; }
#     include "drainbus.vcl";    # looked up in vcl_path (/etc/varnish first)
#
# What drainbus sends (examples/varnish/drainbus.toml holds the matching config):
#
#   PURGE /path?query  Host: site          URL purge: every Vary variant of that URL
#   PURGE /            xkey-purge: t1 t2   tag and key purges (xkey), objects tagged t1 or t2
#   PURGE /            xkey-softpurge: t1  soft tag purge: stale, served in grace, refetched
#   BAN /              Host: site          host and prefix purges: objects of the host whose
#                      X-Ban-Path: REGEX   path matches REGEX (drainbus's {path_regex})
#   BAN /everything                        everything
#
# Objects are tagged with the origin's Cache-Tag and Surrogate-Key headers (commas or spaces
# between tags) as well as its own xkey headers. Tags compare ignoring ASCII case.
#
# Spellings: percent-escapes in the URL are upper-cased (RFC 3986 6.2.2.1: %2f and %2F are
# one URL) and the Host is lower-cased before anything else, for every request, so each
# spelling of those is one object and one purge evicts it. Other spellings stay different
# objects: %41 and A, query parameters in another order, "/a?" and "/a", Host with and
# without its port.

import std;
import xkey;

# Who may purge: add the addresses of the drain nodes.
acl drainbus_purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.http.Host) {
        set req.http.Host = std.tolower(req.http.Host);
    }
    set req.http.X-Drainbus-Url = req.url;
    call drainbus_upper_percent_escapes;
    set req.url = req.http.X-Drainbus-Url;
    unset req.http.X-Drainbus-Url;

    if (req.method == "PURGE" || req.method == "BAN") {
        if (client.ip !~ drainbus_purgers) {
            return (synth(403, "Forbidden"));
        }
    }
    if (req.method == "PURGE") {
        if (req.http.xkey-softpurge) {
            set req.http.X-Drainbus-Gone = xkey.softpurge(std.tolower(req.http.xkey-softpurge));
            return (synth(200, "Soft-purged " + req.http.X-Drainbus-Gone + " objects"));
        }
        if (req.http.xkey-purge || req.http.xkey) {
            set req.http.X-Drainbus-Gone = xkey.purge(
                std.tolower(req.http.xkey-purge + " " + req.http.xkey));
            return (synth(200, "Purged " + req.http.X-Drainbus-Gone + " objects"));
        }
        return (purge);
    }
    if (req.method == "BAN") {
        if (req.http.X-Ban-Path) {
            # The same spelling rule as the URLs stored in X-Drainbus-Url below.
            set req.http.X-Drainbus-Url = req.http.X-Ban-Path;
            call drainbus_upper_percent_escapes;
            if (std.ban("obj.http.X-Drainbus-Host == " + regsub(req.http.Host, ":[0-9]+$", "")
                    + " && obj.http.X-Drainbus-Url ~ " + req.http.X-Drainbus-Url)) {
                return (synth(200, "Banned"));
            }
            return (synth(400, "Ban refused: " + std.ban_error()));
        }
        if (req.url == "/everything") {
            if (std.ban("obj.status != 0")) {
                return (synth(200, "Banned everything"));
            }
            return (synth(400, "Ban refused: " + std.ban_error()));
        }
        return (synth(400, "BAN needs an X-Ban-Path header, or the URL /everything"));
    }
}

# Upper-case the hex digits of every %XX in req.http.X-Drainbus-Url: first digits, then second.
sub drainbus_upper_percent_escapes {
    if (req.http.X-Drainbus-Url ~ "%[0-9A-Fa-f]?[a-f]") {
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%a([0-9A-Fa-f])", "%A\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%b([0-9A-Fa-f])", "%B\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%c([0-9A-Fa-f])", "%C\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%d([0-9A-Fa-f])", "%D\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%e([0-9A-Fa-f])", "%E\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%f([0-9A-Fa-f])", "%F\1");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])a", "%\1A");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])b", "%\1B");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])c", "%\1C");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])d", "%\1D");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])e", "%\1E");
        set req.http.X-Drainbus-Url = regsuball(req.http.X-Drainbus-Url, "%([0-9A-F])f", "%\1F");
    }
}

sub vcl_backend_response {
    # Host and URL on the object, for bans the ban lurker can evaluate in the background.
    set beresp.http.X-Drainbus-Host = regsub(bereq.http.Host, ":[0-9]+$", "");
    set beresp.http.X-Drainbus-Url = bereq.url;
    if (beresp.http.Cache-Tag) {
        set beresp.http.xkey = beresp.http.xkey + " " + beresp.http.Cache-Tag;
    }
    if (beresp.http.Surrogate-Key) {
        set beresp.http.xkey = beresp.http.xkey + " " + beresp.http.Surrogate-Key;
    }
    # Tags match ignoring ASCII case, as on Cloudflare and in drainbus's nginx index: stored
    # and purged lower-cased (std.tolower folds ASCII letters only).
    if (beresp.http.xkey) {
        set beresp.http.xkey = std.tolower(beresp.http.xkey);
    }
}

sub vcl_deliver {
    unset resp.http.X-Drainbus-Host;
    unset resp.http.X-Drainbus-Url;
    unset resp.http.xkey;
}
