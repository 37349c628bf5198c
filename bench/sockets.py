"""Which process of a server's process group holds which TCP connection, read from /proc (Linux).

uvicorn's workers share one listening socket, and a keep-alive connection stays with the worker that accepted it.
The server side of every connection is a socket inode in /proc/net/tcp; exactly one process of the group has that
inode among its descriptors. The workers are the processes that hold the listening socket, less the supervisor
that opened it when there are others (MLServer without parallel workers is a single process, its own leader).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

PROC = Path("/proc")
ESTABLISHED, LISTEN = "01", "0A"


class SocketError(RuntimeError):
    """A connection or a listening socket that /proc does not show where it should be."""


def holder(pgid: int, server_port: int, client_port: int) -> int:
    """The pid holding the server side of the connection from `client_port` to `server_port`."""
    wanted = {inode for inode, remote in _sockets(pgid, server_port, ESTABLISHED) if remote == client_port}
    for pid, inodes in _socket_inodes(pgid).items():
        if inodes & wanted:
            return pid
    raise SocketError(f"no process of group {pgid} holds the connection from port {client_port} to {server_port}")


def connections_per_worker(pgid: int, server_port: int) -> list[int]:
    """Established connections to `server_port` held by each worker of the group, most loaded first."""
    established = {inode for inode, _ in _sockets(pgid, server_port, ESTABLISHED)}
    listening = {inode for inode, _ in _sockets(pgid, server_port, LISTEN)}
    held = _socket_inodes(pgid)
    workers = [pid for pid, inodes in held.items() if inodes & listening]
    if len(workers) > 1:
        workers = [pid for pid in workers if pid != pgid]
    counts = Counter({pid: len(held[pid] & established) for pid in workers})
    return sorted(counts.values(), reverse=True)


def _sockets(pgid: int, local_port: int, state: str) -> list[tuple[str, int]]:
    """(inode, remote port) of the IPv4 sockets in `state` whose local port is `local_port`."""
    found = []
    for line in (PROC / str(pgid) / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, socket_state, inode = fields[1], fields[2], fields[3], fields[9]
        if socket_state == state and int(local.rpartition(":")[2], 16) == local_port:
            found.append((inode, int(remote.rpartition(":")[2], 16)))
    return found


def _socket_inodes(pgid: int) -> dict[int, set[str]]:
    """The socket inodes each live process of the group holds."""
    return {pid: _inodes_of(pid) for pid in _group_pids(pgid)}


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(stat[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _inodes_of(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        descriptors = list((PROC / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = str(descriptor.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes
