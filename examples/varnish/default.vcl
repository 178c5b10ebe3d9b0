# A complete Varnish configuration for one origin, with drainbus's purge endpoints.
# Install: copy default.vcl and drainbus.vcl to /etc/varnish/ (apt-get install varnish
# varnish-modules), set the backend below, restart varnish.
vcl 4.1;

backend default {
    .host = "127.0.0.1";
    .port = "8080";
}

include "drainbus.vcl";
