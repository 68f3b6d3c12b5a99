"""Totality of the parsers that take user or image input: they return a value or raise the documented
error, nothing else (the h11 / image-fuzzer oracle)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aioblock.cli.common import parse_options
from aioblock.drivers import probe_format
from aioblock.errors import InvalidOptionError
from aioblock.sizes import format_size, parse_size


@settings(max_examples=500)
@given(st.text(max_size=40))
def test_parse_size_total(text: str) -> None:
    try:
        value = parse_size(text)
    except InvalidOptionError:
        return
    assert 0 <= value < 1 << 63


@given(st.integers(0, 2**62), st.sampled_from(["", "k", "M", "G", "T"]))
def test_parse_size_suffixes(n: int, suffix: str) -> None:
    scale = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[suffix]
    if n * scale >= 1 << 63:
        return
    assert parse_size(f"{n}{suffix}") == n * scale


@given(st.integers(0, 2**63 - 1))
def test_format_size_total(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    assert unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    assert float(number) < 1000


def test_format_size_matches_qemu_examples() -> None:
    assert format_size(1048576) == "1 MiB"
    assert format_size(12288) == "12 KiB"
    assert format_size(1000) == "0.977 KiB"
    assert format_size(512) == "512 B"
    assert format_size(0) == "0 B"
    assert format_size(3 << 30) == "3 GiB"


@settings(max_examples=500)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_parse_options_total(specs: list[str]) -> None:
    try:
        out = parse_options(specs)
    except InvalidOptionError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


def test_parse_options_escaped_comma() -> None:
    assert parse_options(["a=1,b=x,,y", "c=3"]) == {"a": "1", "b": "x,y", "c": "3"}


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_probe_never_raises(head: bytes) -> None:
    assert probe_format(head, "x") in ("raw",)
