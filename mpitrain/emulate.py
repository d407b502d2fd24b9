"""An emulated cluster on one machine: nodes as network namespaces joined by a bridge, links shaped with tc.

    python -m mpitrain emulate --nodes 4 --ranks-per-node 1 --link 1gbit -- [mpitrain's args | script.py args]

Each node is a network namespace with one veth link to a bridge in a switch namespace; the link is
shaped to --link by a token bucket (tc tbf) in both directions, the node's end and the bridge's end.
Ranks of one node share its namespace, so their traffic to each other stays on its loopback, as on a
real node. The ranks are launched MPMD from here, one block per node, with MPICH's TCP path forced
(otherwise ranks on one host use shared memory whatever their namespace), and each rank is told its
node in MPITRAIN_NODE (the namespaces share a hostname, so MPI alone would see one node).

Everything it makes carries the prefix `mpitrain-<pid>-<n>-` and lives inside namespaces it made; addresses
come from 198.18.0.0/15, the range set aside for network benchmarks. It tears down what it made on
exit, on Ctrl-C and on SIGTERM; a run that was killed outright is cleaned up by the next start (its lock
file is no longer held), and anything whose lock is still held belongs to a live run and is left alone.
Needs root, `ip` and `tc` (iproute2). tbf shapes rate only; this kernel has no netem, so no delay is added.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import Parser, UsageError

PREFIX = "mpitrain-"
OURS = re.compile(r"^mpitrain-(\d+)-(\d+)-(sw|n\d+)$")
NODE_ENV = "MPITRAIN_NODE"  # the emulated node a rank is on (comm.World splits its node communicator by it)
# MPICH over TCP between namespaces, libfabric's tcp provider on each node's link. The ranks of a node
# share memory as on a real node: mpiexec starts one proxy per emulated node (`Cluster.command`), and
# MPICH uses shared memory only among a proxy's ranks
RANK_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
PROBE_PORT = 5201
PROBE_S = 1.0


class SetupError(Exception):
    """The emulated cluster cannot be made here (not root, no iproute2, the kernel refused): exit 2."""

    exit_code = 2


def parse_rate(text: str) -> int:
    """'100mbit', '1gbit', '0.1gbit', '200Mbit' -> bits per second."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|b)?(?:/s|ps)?\s*", text.lower())
    if not found or float(found[1]) <= 0:
        raise UsageError(f"--link {text!r}: give a rate such as 100mbit, 1gbit or 10gbit")
    return int(float(found[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[found[2]])


def rate_text(bps: float) -> str:
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def _lock_dir() -> Path:
    """Where live clusters hold their locks: /run (emptied at boot, as namespaces are), else the temp dir."""
    return Path("/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()) / "mpitrain-emulate"


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _ours_in_use() -> list[str]:
    listed = _sh("ip", "netns", "list").stdout.split()
    return [name for name in listed if OURS.match(name)]


def clean_stale() -> list[str]:
    """Remove the namespaces (and the processes in them) of emulated clusters whose launcher is gone:
    those whose lock file nobody holds. Returns the names removed."""
    removed = []
    for tag in dict.fromkeys(name.rsplit("-", 1)[0] for name in _ours_in_use()):
        lock = _lock_dir() / f"{tag}.lock"
        if lock.exists():
            with open(lock, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run's
        for name in _ours_in_use():
            if name.startswith(tag + "-"):
                _remove_namespace(name)
                removed.append(name)
        lock.unlink(missing_ok=True)
    return removed


def _remove_namespace(name: str):
    """Its processes first (a namespace whose name is deleted lives on while a process is in it), then
    the name; deleting a namespace deletes its ends of the veth pairs, and with them the pairs."""
    for _ in range(50):
        pids = [int(p) for p in _sh("ip", "netns", "pids", name).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _sh("ip", "netns", "del", name)


def check_host():
    """Refuse, in one line, where an emulated cluster cannot be made."""
    if os.geteuid() != 0:
        raise SetupError("emulate needs root (it makes network namespaces and shapes links with tc); run it as root")
    missing = [tool for tool in ("ip", "tc") if not shutil.which(tool)]
    if missing:
        raise SetupError(f"emulate needs {' and '.join(missing)} (iproute2: apt-get install iproute2)")


def mpiexec_path() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if not found:
        raise SetupError("no mpiexec beside this python or on PATH (pip install mpich)")
    return found


class Cluster:
    """`nodes` namespaces of `ranks_per_node` ranks each, every node's link shaped to `link_bps`.

    with Cluster(4, 1, parse_rate("1gbit")) as cluster:
        cluster.run(["-m", "mpitrain", "--compressor", "greedylore"])

    Made on entry (after removing stale clusters), torn down on exit, whatever ended the block."""

    made = 0  # clusters this process has made: part of the names, so each is new

    def __init__(self, nodes: int, ranks_per_node: int, link_bps: int):
        if nodes < 1 or ranks_per_node < 1:
            raise UsageError("emulate: --nodes and --ranks-per-node must be >= 1")
        if nodes > 60000:
            raise UsageError("emulate: at most 60000 nodes (198.18.0.0/15 holds their addresses)")
        self.nodes, self.ranks_per_node, self.link_bps = nodes, ranks_per_node, link_bps
        Cluster.made += 1
        self.tag = f"{PREFIX}{os.getpid()}-{Cluster.made}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-n{i}" for i in range(nodes)]
        self._lock = None
        self._made: list[str] = []

    @staticmethod
    def address(i: int) -> str:
        host = i + 1
        return f"198.{18 + (host >> 16)}.{(host >> 8) & 255}.{host & 255}"

    # -- making and unmaking --------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        check_host()
        clean_stale()
        lock_dir = _lock_dir()
        lock_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(lock_dir / f"{self.tag}.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        self.teardown()

    def _ip(self, *args: str):
        done = _sh(*args)
        if done.returncode != 0:
            raise SetupError(f"emulate: the kernel refused `{' '.join(args)}`: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'exit ' + str(done.returncode)}")

    def _namespace(self, name: str):
        self._ip("ip", "netns", "add", name)
        self._made.append(name)
        self._ip("ip", "-n", name, "link", "set", "lo", "up")

    def _shape(self, namespace: str, dev: str, bps: int, verb: str = "add"):
        burst = max(256 * 1024, bps // 8 // 500)  # 2 ms of the link: enough for tbf at 10 Gbit/s
        self._ip("tc", "-n", namespace, "qdisc", verb, "dev", dev, "root", "tbf", "rate", f"{bps}bit",
                 "burst", str(burst), "latency", "100ms")

    def _build(self):
        self._namespace(self.switch)
        self._ip("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            self._namespace(name)
            # both ends are made inside our namespaces: nothing appears in the root namespace
            self._ip("ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}",
                     "netns", self.switch)
            self._ip("ip", "-n", name, "addr", "add", f"{self.address(i)}/15", "dev", "eth0")
            self._ip("ip", "-n", name, "link", "set", "eth0", "up")
            self._ip("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            self._ip("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
            self._shape(name, "eth0", self.link_bps)
            self._shape(self.switch, f"p{i}", self.link_bps)

    def teardown(self):
        for name in reversed(self._made):
            _remove_namespace(name)
        self._made = []
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    # -- links ----------------------------------------------------------------------------
    def set_link(self, i: int, bps: int | None):
        """Node i's link at a new rate (both directions), or cut (None): for fault tests and what-ifs."""
        if bps is None:
            self._ip("ip", "-n", self.names[i], "link", "set", "eth0", "down")
            self._ip("ip", "-n", self.switch, "link", "set", f"p{i}", "down")
            return
        self._shape(self.names[i], "eth0", bps, "change")
        self._shape(self.switch, f"p{i}", bps, "change")

    def sent_bytes(self) -> list[int]:
        """The bytes each node's link has carried out of it so far, as its interface counts them
        (headers and all): what a job really sent across the network."""
        stats = [_sh("ip", "-n", name, "-s", "-j", "link", "show", "eth0") for name in self.names]
        return [json.loads(done.stdout)[0]["stats64"]["tx"]["bytes"] for done in stats]

    def measure(self, seconds: float = PROBE_S) -> list[float]:
        """Each link's achieved rate in bits/s: every node sends to the next for `seconds` at once (a ring,
        so each link carries one stream each way), measured at the receiver."""
        if self.nodes < 2:
            return []
        probe = [sys.executable, "-c", "import sys; from mpitrain.emulate import _probe; _probe(*sys.argv[1:])"]
        env = {**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        servers = [subprocess.Popen(["ip", "netns", "exec", name, *probe, "serve", str(seconds)], env=env,
                                    stdout=subprocess.PIPE, text=True) for name in self.names]
        clients = [subprocess.Popen(["ip", "netns", "exec", name, *probe, "send", self.address((i + 1) % self.nodes),
                                     str(seconds)], env=env) for i, name in enumerate(self.names)]
        rates = [0.0] * self.nodes
        for i, server in enumerate(servers):  # server i heard node i-1: that is node i-1's uplink
            out, _ = server.communicate(timeout=30 + 4 * seconds)
            rates[(i - 1) % self.nodes] = json.loads(out or '{"bps": 0}')["bps"]
        for client in clients:
            client.wait(timeout=30)
        return rates

    # -- running ranks --------------------------------------------------------------------
    def command(self, argv: list[str], mpiexec: str | None = None) -> list[str]:
        """The MPMD mpiexec command: one block per node, each rank in its node's namespace, told its node.
        Each node is a host to mpiexec (hydra's fork launcher starts its proxy here), so that its ranks
        share memory with each other and with no other node's (a 4 MB Allreduce between a node's two
        ranks: 1.5-2.2 ms, against 5.7-6.7 ms over the namespace's loopback with shared memory off)."""
        hosts = ",".join(f"{name}:{self.ranks_per_node}" for name in self.names)
        cmd = [mpiexec or mpiexec_path(), "-launcher", "fork", "-hosts", hosts]
        for i, name in enumerate(self.names):
            cmd += ([":"] if i else []) + ["-n", str(self.ranks_per_node), "ip", "netns", "exec", name,
                                          "env", f"{NODE_ENV}={name}", sys.executable, *argv]
        return cmd

    def env(self, base: dict | None = None) -> dict:
        return {**(os.environ if base is None else base), **RANK_ENV}

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start the ranks; mpiexec gets SIGTERM should this process die first (its ranks go with it)."""
        kwargs.setdefault("env", self.env())
        return subprocess.Popen(self.command(argv), preexec_fn=_die_with_parent, **kwargs)

    def run(self, argv: list[str], timeout: float | None = None, **kwargs) -> int:
        """Run the ranks to the end; SIGTERM/SIGINT here are passed on to mpiexec, which ends its ranks."""
        proc = self.popen(argv, **kwargs)
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        before = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _probe(role: str, *args: str):
    """The rate probe, run inside a node's namespace: `serve SECONDS` or `send ADDRESS SECONDS`."""
    import socket
    if role == "serve":
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", PROBE_PORT))
            s.listen(1)
            s.settimeout(20)
            conn, _ = s.accept()
            with conn:  # the rate after the first 0.2 s: past tbf's initial burst and the sender's start
                got, start, mark, last = 0, None, None, None
                while chunk := conn.recv(1 << 16):
                    now = time.perf_counter()
                    start = start or now
                    if mark is None and now - start >= 0.2:
                        mark = (now, got)
                    got, last = got + len(chunk), now
        rate = (got - mark[1]) * 8 / max(last - mark[0], 1e-9) if mark else 0.0
        print(json.dumps({"bps": rate}), flush=True)
        return
    address, seconds = args[0], float(args[1])
    chunk = bytes(1 << 16)
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection((address, PROBE_PORT), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with s:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.sendall(chunk)


# -- the command ----------------------------------------------------------------------------

def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    rest = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1:]
    parser = Parser(prog="mpitrain emulate", description="Run an mpitrain command (training, bench ..., or a "
                    "script.py of your own) on an emulated cluster: nodes as network namespaces, links shaped with tc. "
                    "Needs root. Example: python -m mpitrain emulate --nodes 4 --link 1gbit -- --compressor greedylore")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="ranks on each node (default 1)")
    parser.add_argument("--link", default="1gbit", help="each node's link, both directions: e.g. 100mbit, 1gbit, "
                        "10gbit (default 1gbit)")
    parser.add_argument("--clean", action="store_true", help="only remove what killed runs left behind, and exit")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.ranks_per_node < 1:
        parser.error("--nodes and --ranks-per-node must be >= 1")
    args.link_bps = parse_rate(args.link)
    if not rest and not args.clean:
        parser.error("give the command after --: mpitrain's arguments, or script.py and its arguments")
    return args, rest


def rank_argv(rest: list[str]) -> list[str]:
    """A script of the user's runs as itself; anything else is mpitrain's arguments."""
    if rest and rest[0].endswith(".py"):
        return rest
    return ["-m", "mpitrain", *rest]


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cluster's `with`: what was made is removed


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)  # while the cluster is made and measured; its ranks get it forwarded
    try:
        args, rest = parse(argv)
        check_host()
        if args.clean:
            removed = clean_stale()
            print(f"mpitrain emulate: removed {len(removed)} namespace(s) of killed runs", flush=True)
            return 0
        with Cluster(args.nodes, args.ranks_per_node, args.link_bps) as cluster:
            rates = cluster.measure()
            achieved = ", ".join(f"{name.rsplit('-', 1)[1]} {rate_text(r)}" for name, r in zip(cluster.names, rates))
            print(f"mpitrain emulate: {args.nodes} node(s) x {args.ranks_per_node} rank(s), links "
                  f"{rate_text(args.link_bps)} each way" + (f"; achieved {achieved}" if rates else ""), flush=True)
            code = cluster.run(rank_argv(rest))
            return code if code >= 0 else 128 - code
    except (UsageError, SetupError) as e:
        print(f"mpitrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
