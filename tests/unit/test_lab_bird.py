"""lab.bird.parse_route reads what the BIRD tests compare from ``birdc show route ... all``."""

from __future__ import annotations

from lab.bird import parse_route

SHOW = """\
BIRD 2.0.12 ready.
Table master4:
198.51.100.10/32     unicast [agent 11:40:01.123] * (100) [AS65101i]
\tvia 100.64.1.2 on eth-pop
\tType: BGP univ
\tBGP.origin: IGP
\tBGP.as_path: 65101 65101 65101 65101
\tBGP.next_hop: 100.64.1.2
\tBGP.med: 1000
\tBGP.local_pref: 100
\tBGP.community: (65101,666) (65535,0)
\tBGP.large_community: (65101, 1, 2)
"""


def test_parses_the_best_path() -> None:
    r = parse_route("198.51.100.10/32", SHOW)
    assert r is not None
    assert r.as_path == (65101,) * 4
    assert r.med == 1000
    assert r.communities == ((65101, 666), (65535, 0))
    assert r.large_communities == ((65101, 1, 2),)


def test_absent_prefix_is_none() -> None:
    assert parse_route("198.51.100.10/32", "BIRD 2.0.12 ready.\nNetwork not found\n") is None
