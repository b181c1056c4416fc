"""core.cluster: where a driver connects, and a cluster that is not there found at once."""

from __future__ import annotations

import socket

import pytest
from helpers import free_port

from core.cluster import CLIENT_PORT, endpoint, unreachable


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("head.example:6380", ("head.example", 6380)),
        ("ray://head:10002", ("head", 10002)),
        ("ray://head", ("head", CLIENT_PORT)),
        ("[::1]:6379", ("::1", 6379)),
        ("ray://[::1]", ("::1", CLIENT_PORT)),
        ("auto", None),  # Ray finds the local cluster itself
        ("local", None),
        ("head", None),  # no port: Ray says what is wrong
    ],
)
def test_endpoint_is_the_host_and_port_a_driver_connects_to(address, expected):
    assert endpoint(address) == expected


def test_unreachable_says_why_a_port_does_not_answer():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable("127.0.0.1", server.getsockname()[1]) is None
    assert unreachable("127.0.0.1", free_port()) == "Connection refused"
