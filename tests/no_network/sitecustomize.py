"""TEST HOOK for tests/test_no_network.py, inert unless MTRL_BLOCK_NETWORK is set.

With MTRL_BLOCK_NETWORK=LOGFILE and this folder first on PYTHONPATH, every Python process of a run (the
driver, and the Ray workers, which inherit the driver's environment) refuses to resolve any host name but
its own and to connect anywhere but to this machine (loopback, or an address of one of its interfaces),
and appends to LOGFILE one line per refused attempt ("resolve HOST", "connect HOST:PORT") besides a
"start PID ARGV" line, so the test sees which processes were covered.
"""

import os

_LOG = os.environ.get("MTRL_BLOCK_NETWORK")

if _LOG:
    import errno
    import ipaddress
    import socket
    import sys

    def _record(line):
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {line}\n")

    _getaddrinfo, _gethostbyname, _connect, _connect_ex = (socket.getaddrinfo, socket.gethostbyname,
                                                           socket.socket.connect, socket.socket.connect_ex)
    _OWN_NAMES = {"localhost", socket.gethostname()}
    _local_cache = {}

    def _is_local_ip(host):
        """Loopback, the wildcard, or an address this machine can bind (one of its own interfaces)."""
        if host not in _local_cache:
            ip = ipaddress.ip_address(host.split("%")[0])
            local = ip.is_loopback or ip.is_unspecified
            if not local:
                family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                probe = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    probe.bind((host, 0))
                    local = True
                except OSError:
                    local = False
                finally:
                    probe.close()
            _local_cache[host] = local
        return _local_cache[host]

    def _name_allowed(host):
        if host is None or host == "":
            return True
        if isinstance(host, bytes):
            host = host.decode()
        try:
            return _is_local_ip(host)
        except ValueError:  # a name, not an address
            return host in _OWN_NAMES

    def getaddrinfo(host, *args, **kwargs):
        if not _name_allowed(host):
            _record(f"resolve {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"network blocked by the test hook: {host}")
        return _getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):
        if not _name_allowed(host):
            _record(f"resolve {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"network blocked by the test hook: {host}")
        return _gethostbyname(host)

    def _check(sock, address):
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or _name_allowed(address[0]):
            return True
        _record(f"connect {address[0]}:{address[1]}")
        return False

    def connect(self, address):
        if not _check(self, address):
            raise OSError(errno.ENETUNREACH, f"network blocked by the test hook: {address}")
        return _connect(self, address)

    def connect_ex(self, address):
        if not _check(self, address):
            return errno.ENETUNREACH
        return _connect_ex(self, address)

    socket.getaddrinfo, socket.gethostbyname = getaddrinfo, gethostbyname
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    _record("start " + " ".join(getattr(sys, "argv", []))[:200])
