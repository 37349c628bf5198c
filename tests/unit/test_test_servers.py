"""The ports the tests start their own S3 server (SeaweedFS) on."""

from __future__ import annotations

from tests.support.servers import free_port_pairs


def test_seaweedfs_ports_never_take_each_others_grpc_ports() -> None:
    """Each SeaweedFS server also listens 10000 above its port; a server whose port is another's gRPC port makes
    `weed mini` exit at start."""
    for _ in range(300):
        ports = free_port_pairs(5)
        assert len({*ports, *(port + 10000 for port in ports)}) == 10
