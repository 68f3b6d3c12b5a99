"""``convert``'s zero detection: the runs of non-zero ``-S`` blocks it writes, against a byte-by-byte model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aioblock.cli.convert import _data_runs, _is_zero


def model(data: bytes, offset: int, block: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        end = min((offset + pos) // block * block + block - offset, len(data))
        if any(data[pos:end]):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
        pos = end
    return runs


@st.composite
def buffers(draw: st.DrawFn) -> tuple[bytearray, int, int, int]:
    block = draw(st.sampled_from([512, 1024, 1536, 4096, 65536]))
    length = draw(st.integers(1, 5 * block))
    buf = bytearray(length)
    for pos, value in draw(st.lists(st.tuples(st.integers(0, length - 1), st.integers(1, 255)), max_size=12)):
        buf[pos] = value
    for pos, n in draw(st.lists(st.tuples(st.integers(0, length - 1), st.integers(1, 3 * block)), max_size=3)):
        buf[pos:pos + n] = bytes(range(1, 256)) * (n // 255 + 1)
        del buf[length:]
    buf += b"\x01" * draw(st.integers(0, 8))          # bytes past the job's length are not looked at
    return buf, length, draw(st.integers(0, 1 << 22)), block


@settings(max_examples=400, deadline=None)
@given(buffers())
def test_data_runs_are_the_non_zero_blocks(case: tuple[bytearray, int, int, int]) -> None:
    buf, length, offset, block = case
    assert _data_runs(buf, length, offset, block) == model(bytes(buf[:length]), offset, block)


def test_is_zero_beyond_the_zero_view() -> None:
    buf = bytearray(5 << 20)
    assert _is_zero(buf, 0, len(buf)) and _is_zero(buf, 3, len(buf) - 3)
    buf[-1] = 1
    assert not _is_zero(buf, 0, len(buf)) and _is_zero(buf, 0, len(buf) - 1)
