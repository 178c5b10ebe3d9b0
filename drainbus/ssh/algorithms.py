"""The algorithms the SSH door offers: ciphers, key exchanges, MACs, client signatures.

One job: what ``asyncssh.create_server`` is told to negotiate, and why each list is what it
is (client compatibility, CPU cost, no SHA-1). ``SIG_ALG_SET`` is also enforced per key at
login, since asyncssh checks only that a signature suits the key's type.
"""

from __future__ import annotations

from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs

__all__ = ["CIPHERS", "KEX_ALGS", "MAC_ALGS", "SIG_ALGS", "SIG_ALG_SET"]

# AES-GCM first, and no chacha20-poly1305: asyncssh's chacha20 costs about six times more
# CPU per packet than AES-GCM (which uses AES-NI through OpenSSL). AES-CTR stays for clients
# without AES-GCM: Dropbear 2022.83 offers only chacha20-poly1305 and AES-CTR.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

# Key exchange: OpenSSH's default list (below) with curve25519-sha256 at the front. Dropbear's
# dbclient sends its key-exchange packet before negotiation ends, guessing its first choice
# (RFC 4253 section 7, first_kex_packet_follows). Dropbear counts the guess right only when
# both sides list the same algorithm first (and the same host key algorithm first: ours is
# ssh-ed25519, as is Dropbear's), while asyncssh counts it right whenever the client's first
# choice is one it supports. When the two disagree, asyncssh runs the guessed packet, Dropbear
# sends the real one, and asyncssh drops the connection: dbclient 2022.83 (first choice
# curve25519-sha256) against asyncssh's default list (mlkem768x25519-sha256 first) fails so.
# Leading with curve25519-sha256 makes the guess right for both. Dropbear 2025.87 and later
# guess sntrup761x25519-sha512, which asyncssh offers only when liboqs is installed: without
# it both sides count that guess wrong and agree again (tests/test_clients.py is the check).
# The post-quantum exchanges stay in the list: the negotiated algorithm is the client's first
# choice that the server offers, so an OpenSSH that prefers mlkem768x25519-sha256 still gets it.
#
# The rest is what OpenSSH 10's sshd offers by default, limited to what this asyncssh has
# (sntrup761 needs liboqs): no finite-field Diffie-Hellman (OpenSSH 10 dropped it from the
# server; diffie-hellman-group14-sha1 is SHA-1), no gss-* (no Kerberos here), no curve448 or
# secp256k1 (OpenSSH has neither).
_OPENSSH_KEX = (
    "curve25519-sha256",
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
)
KEX_ALGS = [alg for alg in _OPENSSH_KEX if alg.encode() in get_kex_algs()]

# OpenSSH's default MACs without the SHA-1 ones (hmac-sha1, hmac-sha1-etm), which it still
# offers. Only the AES-CTR ciphers use a MAC; AES-GCM authenticates itself.
_OPENSSH_MACS = (
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
MAC_ALGS = [alg for alg in _OPENSSH_MACS if alg.encode() in get_mac_algs()]

# Client signatures OpenSSH accepts by default (PubkeyAcceptedAlgorithms; webauthn is how a
# browser's security key signs for an sk-ecdsa key): no ssh-rsa (RSA with SHA-1), no ssh-dss.
# Advertised in server-sig-algs, and enforced on each key at login (asyncssh checks only that
# a signature suits the key's type).
SIG_ALGS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
SIG_ALG_SET = frozenset(alg.encode() for alg in SIG_ALGS)
