"""``aioblock io``: an emulation of ``qemu-io`` (QEMU 7.2) over the public API.

Each command line is split on spaces and run against one open disk; the output is qemu-io's, byte for byte,
except the timing figures of the statistics lines. The behaviour was taken from running qemu-io 7.2, not from
its sources; where qemu-io is odd we copy the output anyway and say so in a comment (look for "qemu-io quirk").

Commands are a table of :class:`Command` entries (qemu-io's ``cmdinfo_t``): a name and alias, the argument
count bounds checked before the handler runs, whether a file must be open and whether the command writes (then a
read-only disk refuses it before the handler runs). A handler returns True on success and False on failure;
``aioblock io`` exits 1 when any command failed, 0 otherwise, as qemu-io does.

Concurrency: ``aio_read`` and ``aio_write`` start one task each and return at once; each task prints its own
completion lines when its request finishes, so they may come in any order and between other commands' lines.
``aio_flush``, ``close`` and the end of the command list wait for every outstanding task. All output is written
from the event loop's thread, one whole line group at a time, so lines never interleave.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import math
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import api
from ..backend import BlockBackend
from ..errors import AioblockError, InvalidOptionError, strerror
from .common import CACHE_MODES, cache_mode, parse_options

__all__ = ["add_parser", "cvtnum", "cvtstr", "run"]

#: Prefix of qemu-io's ``error_report`` lines. Kept as qemu-io's own name so that scripts and output filters
#: written for qemu-io work unchanged (the brief: byte-for-byte output).
PROG = "qemu-io"
PROMPT = "qemu-io> "
#: Largest request qemu-io accepts (its BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to 512).
MAX_REQUEST = 2147483136
#: Signals qemu-io keeps blocked or ignored, so ``sigraise`` of them has no effect there.
_QEMU_IO_BLOCKED = frozenset({signal.SIGBUS, signal.SIGUSR1, signal.SIGALRM, signal.SIGIO, signal.SIGPIPE})
_NSIG = 65
_DEFAULT_WRITE_PATTERN = 0xCD
_AIO_MODES = {"threads": "threads", "io_uring": "uring"}


# ---- numbers and sizes, as qemu-io reads and prints them ---------------------------------------------------

class NumberError(ValueError):
    """A size argument qemu-io refuses; ``too_large`` selects its message."""

    def __init__(self, text: str, *, too_large: bool) -> None:
        super().__init__(text)
        self.text, self.too_large = text, too_large

    def message(self) -> str:
        if self.too_large:
            return f"Parsing error: argument too large -- {self.text}"
        return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {self.text}"


_SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_NUMBER = re.compile(r"[ \t\n\v\f\r]*\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<dec>[0-9]+))(?P<rest>.*)", re.S)
_U64_MAX = (1 << 64) - 1
_I64_MAX = (1 << 63) - 1


def cvtnum(text: str, *, warn: Callable[[str], None] | None = None) -> int:
    """A size argument: decimal (with an optional fraction when a suffix follows) or 0x hex, and an optional
    binary suffix b/k/M/G/T/P/E (any case). Raises :class:`NumberError`. ``warn`` receives qemu-io's
    deprecation warning for a suffix on a hex number."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise NumberError(text, too_large=False)
    rest = m["rest"]
    value = int(m["hex"], 16) if m["hex"] is not None else int(m["dec"])
    if value > _U64_MAX:                    # qemu-io quirk: out of range alone, but "invalid" with anything after
        raise NumberError(text, too_large=not rest)
    fraction = 0.0
    if m["dec"] is not None and rest.startswith("."):
        fm = re.match(r"\.([0-9]*)", rest)
        assert fm is not None
        if fm[1]:
            fraction = float("0." + fm[1])
        rest = rest[fm.end():]
    shift = 0
    if rest:
        suffix = _SUFFIXES.get(rest[0].lower())
        if suffix is None or len(rest) > 1:
            raise NumberError(text, too_large=False)
        shift = suffix
        if m["hex"] is not None and warn is not None:
            warn(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {text}")
    if shift == 0 and fraction:
        raise NumberError(text, too_large=False)        # fractional bytes
    if fraction >= 1.0:
        fraction = 0.0                  # qemu-io quirk: "4.9999999999999999999k" (rounds to 5.0) reads as 4k
    result = (value << shift) + math.floor(fraction * (1 << shift) + 0.5) if fraction else value << shift
    if result > _I64_MAX:                   # qemu-io's sizes are signed 64-bit
        raise NumberError(text, too_large=True)
    return result


def _c_long(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` that must consume everything; None when it does not."""
    m = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if m is None:
        return None
    digits = m[2]
    if digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8) if len(digits) > 1 else 0
    else:
        value = int(digits)
    value = -value if m[1] == "-" else value
    return max(min(value, _I64_MAX), -_I64_MAX - 1)     # ERANGE clamps, as strtol does


def _unit_string(value: float, precision: int, unit: str) -> str:
    text = f"{value:.{precision}f}"
    zeroes = "." + "0" * precision
    if text.endswith(zeroes):
        text = text[:-len(zeroes)]
    return f"{text} {unit}"


def cvtstr(value: float) -> str:
    """qemu-io's human size: ``4 KiB``, ``1.500 KiB``, ``1023.999 KiB``, ``512 bytes``, ``0.002562 bytes``."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            return _unit_string(value / (1 << shift), 3, unit)
    return _unit_string(value, 6, "bytes")


def _timestr(seconds: float, *, fixed: bool) -> str:
    whole = int(seconds)
    centis = int((seconds - whole) * 100)
    if fixed or whole:
        return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}.{centis:02d}"
    return f"{whole:02d}.{centis:02d} sec"


def _report(out: list[str], elapsed: float, total: int, *, csv: bool, ops: int = 1) -> None:
    """The statistics line (``-C``: the machine-readable one)."""
    elapsed = max(elapsed, 1e-9)
    if csv:
        out.append(f"{total},{ops},{_timestr(elapsed, fixed=True)},{total / elapsed:.3f},{ops / elapsed:.3f}")
    else:
        out.append(f"{cvtstr(total)}, {ops} ops; {_timestr(elapsed, fixed=False)} "
                   f"({cvtstr(total / elapsed)}/sec and {ops / elapsed:.4f} ops/sec)")


def _dump(out: list[str], data: bytes, offset: int) -> None:
    """``-v``: 16 bytes a line, the absolute offset, hex, then only letters and digits as text."""
    for pos in range(0, len(data), 16):
        chunk = data[pos:pos + 16]
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        out.append(f"{offset + pos:08x}:  {' '.join(f'{b:02x}' for b in chunk)}  {text}")


def _format_specific(value: Any, key: str, indent: int, out: list[str]) -> None:
    pad = "    " * indent
    name = key.replace("-", " ")
    if isinstance(value, dict):
        out.append(f"{pad}{name}:")
        for k, v in value.items():
            _format_specific(v, str(k), indent + 1, out)
    elif isinstance(value, list | tuple):
        out.append(f"{pad}{name}:")
        for i, v in enumerate(value):
            _format_specific(v, f"[{i}]", indent + 1, out)
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out.append(f"{pad}{name}: {text}")


# ---- GNU getopt, as qemu-io's commands parse their options -------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Opt:
    letter: str
    arg: str | None = None
    error: str | None = None           # getopt's own message (printed to stderr, then the usage line)


def _getopt(prog: str, argv: Sequence[str], optstring: str) -> tuple[list[_Opt], list[str]]:
    """Options in order of appearance, then the operands. GNU semantics: options may follow operands, ``--``
    ends the options, ``-qv`` groups letters, ``-P3`` or ``-P 3`` give an argument (which may start with
    ``-``). Scanning stops at the first error, which is the last item."""
    opts: list[_Opt] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            spec = optstring.find(letter) if letter != ":" else -1
            if spec < 0:
                opts.append(_Opt(letter, error=f"{prog}: invalid option -- '{letter}'"))
                return opts, operands
            if optstring[spec + 1:spec + 2] != ":":
                opts.append(_Opt(letter))
                continue
            if pos < len(arg):
                opts.append(_Opt(letter, arg[pos:]))
            elif i < len(argv):
                opts.append(_Opt(letter, argv[i]))
                i += 1
            else:
                opts.append(_Opt(letter, error=f"{prog}: option requires an argument -- '{letter}'"))
                return opts, operands
            break
    return opts, operands


# ---- the command table ---------------------------------------------------------------------------------------

Handler = Callable[["Session", str, list[str]], "bool | Awaitable[bool]"]


@dataclass(frozen=True, slots=True)
class Command:
    """One qemu-io command. ``args`` is None for commands whose help line shows no argument part."""

    name: str
    handler: Handler
    oneline: str
    args: str | None = None
    argmin: int = 0
    argmax: int = 0                     # -1: no upper bound
    altname: str | None = None
    needs_file: bool = True
    writes: bool = False
    help: str | None = None             # extended help (``help NAME``; where qemu-io has one), in our own words

    def usage_line(self, name: str | None = None) -> str:
        shown = name or self.name
        return f"{shown} {self.args} -- {self.oneline}" if self.args is not None else f"{shown} -- {self.oneline}"


class _Failed(Exception):
    """A command failed after printing why (internal: turns into the handler's False)."""


@dataclass
class Session:
    """One qemu-io session: the open disk (or none), the output streams, and the outstanding aio tasks.

    Touched only from the event loop's thread. ``tasks`` holds every aio request still running; they are
    awaited by ``aio_flush``, ``close`` and the end of the session and never outlive it.
    """

    disk: BlockBackend | None
    engine: str | None
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    fua: bool = False                   # cache=writethrough/directsync: every write is FUA
    unsafe: bool = False                # cache=unsafe: flush does nothing
    quit: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # -- output ---------------------------------------------------------------------------------------------

    def out(self, *lines: str) -> None:
        for line in lines:
            self.stdout.write(line + "\n")

    def err(self, *lines: str) -> None:
        # stdout is not flushed first: like qemu-io's stdio, a piped stdout is block-buffered and so comes
        # after stderr when both go to one pipe; on a terminal both are line-buffered and stay in order
        for line in lines:
            self.stderr.write(line + "\n")
        self.stderr.flush()

    def fail(self, *lines: str, stderr: bool = False) -> _Failed:
        (self.err if stderr else self.out)(*lines)
        return _Failed()

    def num(self, text: str) -> int:
        try:
            return cvtnum(text, warn=self.err)
        except NumberError as exc:
            raise self.fail(exc.message()) from None

    def pattern(self, text: str) -> int:
        value = _c_long(text)
        if value is None or not 0 <= value <= 255:
            raise self.fail(f"{text} is not a valid pattern byte")
        return value

    def usage(self, cmd: Command) -> _Failed:
        return self.fail(cmd.usage_line())

    def check(self, cmd: Command, opt: _Opt) -> None:
        if opt.error is not None:
            self.err(opt.error)
            raise self.usage(cmd)

    @property
    def open_disk(self) -> BlockBackend:
        assert self.disk is not None          # the dispatcher checks Command.needs_file
        return self.disk

    # -- aio ------------------------------------------------------------------------------------------------

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run one aio request as a task owned by the session."""
        task = asyncio.get_running_loop().create_task(coro, name="aioblock-io-aio")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait_aio(self) -> None:
        """Wait until every aio request started so far (and any started meanwhile) has completed."""
        while self.tasks:
            await asyncio.gather(*self.tasks)

    # -- dispatch -------------------------------------------------------------------------------------------

    async def execute(self, line: str) -> bool:
        """Run one command line; True on success (an empty line succeeds)."""
        argv = [word for word in line.split(" ") if word]      # qemu-io splits on spaces only, not tabs
        if not argv:
            return True
        name = argv[0]
        cmd = COMMANDS_BY_NAME.get(name)
        if cmd is None:
            self.err(f'command "{name}" not found')
            return False
        if cmd.needs_file and self.disk is None:
            self.err("no file open, try 'help open'")
            return False
        count = len(argv) - 1
        if count < cmd.argmin or (cmd.argmax >= 0 and count > cmd.argmax):
            if cmd.argmax == cmd.argmin:
                expected = f"{cmd.argmin} arguments"
            elif cmd.argmax < 0:
                expected = f"at least {cmd.argmin} arguments"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax} arguments"
            self.err(f"bad argument count {count} to {name}, expected {expected}")
            return False
        if cmd.writes and self.disk is not None and self.disk.read_only:
            self.err(f"{PROG}: Block node is read-only")
            return False
        try:
            result = cmd.handler(self, name, argv[1:])
            if inspect.isawaitable(result):
                result = await result
        except _Failed:
            return False
        return bool(result)

    async def close(self) -> None:
        await self.wait_aio()
        disk, self.disk = self.disk, None
        if disk is not None:
            await disk.close()


def _io_failure(session: Session, what: str, exc: BaseException) -> _Failed:
    return session.fail(f"{what} failed: {strerror(exc)}")


_IO_ERRORS = (AioblockError, OSError)


# ---- read / readv / aio_read ---------------------------------------------------------------------------------

def _verify(out: list[str], data: bytes, offset: int, start: int, length: int,
            pattern: int) -> bool:
    if data[start:start + length] != bytes([pattern]) * length:
        out.append(f"Pattern verification failed at offset {offset + start}, {length} bytes")
        return False
    return True


async def _read(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["read"]
    # qemu-io quirk: the usage line lists -a, which read refuses as an invalid option; and -q also hides -v
    opts, operands = _getopt(name, args, "bCl:pqs:vP:")
    csv = quiet = verbose = vmstate = False
    pattern: int | None = None
    pattern_offset = 0
    pattern_count: int | None = None
    s_given = False
    for opt in opts:
        session.check(cmd, opt)
        if opt.letter == "b":
            vmstate = True
        elif opt.letter == "C":
            csv = True
        elif opt.letter == "q":
            quiet = True
        elif opt.letter == "v":
            verbose = True
        elif opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
        elif opt.letter == "s":
            assert opt.arg is not None
            pattern_offset, s_given = session.num(opt.arg), True
        elif opt.letter == "l":
            assert opt.arg is not None
            pattern_count = session.num(opt.arg)
        # -p: ignored, for compatibility
    if len(operands) != 2:
        raise session.usage(cmd)
    offset = session.num(operands[0])
    count = session.num(operands[1])
    if count > MAX_REQUEST:
        raise session.fail(f"length cannot exceed {MAX_REQUEST}, given {operands[1]}")
    if (s_given or pattern_count is not None) and pattern is None:
        raise session.usage(cmd)
    if pattern_count is None:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_offset + pattern_count > count:
        raise session.fail("pattern verification range exceeds end of read data")
    if vmstate:
        for what, value in (("offset", offset), ("count", count)):
            if value % 512:
                raise session.fail(f"{value} is not a sector-aligned value for '{what}'")
        raise session.fail("read failed: Operation not supported")     # no VM state in aioblock
    t0 = time.perf_counter()
    try:
        data = await session.open_disk.read(offset, count)
    except _IO_ERRORS as exc:
        raise _io_failure(session, "read", exc) from None
    return _read_completion(session, data, offset, time.perf_counter() - t0, pattern=pattern, quiet=quiet,
                            verbose=verbose, csv=csv, check=(pattern_offset, pattern_count))


def _lengths(session: Session, operands: list[str]) -> int:
    """The ``len [len..]`` operands of readv/writev/aio_*: each and their sum at most MAX_REQUEST."""
    total = 0
    for text in operands:
        n = session.num(text)
        if n > MAX_REQUEST:
            raise session.fail(f"Argument '{text}' exceeds maximum size {MAX_REQUEST}")
        total += n
        if total > MAX_REQUEST:
            raise session.fail(f"The total number of bytes exceed the maximum size {MAX_REQUEST}")
    return total


def _read_completion(session: Session, data: bytes, offset: int, elapsed: float, *, pattern: int | None,
                     quiet: bool, verbose: bool, csv: bool, check: tuple[int, int] | None = None) -> bool:
    """Print a completed read: pattern check (``check``: which part of the buffer, default all of it), hex
    dump, statistics. False if the pattern check failed."""
    out: list[str] = []
    count = len(data)
    start, length = check if check is not None else (0, count)
    ok = pattern is None or _verify(out, data, offset, start, length, pattern)
    if not quiet:
        if verbose:
            _dump(out, data, offset)
        if not csv:
            out.append(f"read {count}/{count} bytes at offset {offset}")
        _report(out, elapsed, count, csv=csv)
    session.out(*out)
    return ok


async def _readv(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["readv"]
    opts, operands = _getopt(name, args, "CqvP:")
    csv = quiet = verbose = False
    pattern: int | None = None
    for opt in opts:
        session.check(cmd, opt)
        if opt.letter == "C":
            csv = True
        elif opt.letter == "q":
            quiet = True
        elif opt.letter == "v":
            verbose = True
        elif opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
    if len(operands) < 2:
        raise session.usage(cmd)
    offset = session.num(operands[0])
    count = _lengths(session, operands[1:])
    t0 = time.perf_counter()
    try:
        data = await session.open_disk.read(offset, count)
    except _IO_ERRORS as exc:
        raise _io_failure(session, "readv", exc) from None
    return _read_completion(session, data, offset, time.perf_counter() - t0, pattern=pattern, quiet=quiet,
                            verbose=verbose, csv=csv)


def _aio_read(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["aio_read"]
    opts, operands = _getopt(name, args, "CP:qvi")
    csv = quiet = verbose = False
    pattern: int | None = None
    for opt in opts:
        session.check(cmd, opt)
        if opt.letter == "C":
            csv = True
        elif opt.letter == "q":
            quiet = True
        elif opt.letter == "v":
            verbose = True
        elif opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
        elif opt.letter == "i":
            # qemu-io quirk: -i only accounts an invalid request in the statistics and succeeds at once,
            # whatever else is on the line
            session.out("injecting invalid read request")
            return True
    if len(operands) < 2:
        raise session.usage(cmd)
    offset = session.num(operands[0])
    count = _lengths(session, operands[1:])
    disk = session.open_disk

    async def request() -> None:
        t0 = time.perf_counter()
        try:
            data = await disk.read(offset, count)
        except _IO_ERRORS as exc:
            session.out(f"readv failed: {strerror(exc)}")       # qemu-io quirk: "readv", not "aio_read"
            return
        # an aio request "succeeds once submitted": a pattern mismatch does not fail the command
        _read_completion(session, data, offset, time.perf_counter() - t0, pattern=pattern, quiet=quiet,
                         verbose=verbose, csv=csv)

    session.start(request())
    return True


# ---- write / writev / aio_write ------------------------------------------------------------------------------

def _done(session: Session, verb: str, offset: int, count: int, elapsed: float, flags: set[str]) -> None:
    """Print a completed write or discard: ``wrote N/N bytes at offset X`` and statistics (-C: only the
    machine-readable line; -q: nothing)."""
    if "q" in flags:
        return
    out: list[str] = []
    if "C" not in flags:
        out.append(f"{verb} {count}/{count} bytes at offset {offset}")
    _report(out, elapsed, count, csv="C" in flags)
    session.out(*out)


def _fill(session: Session, source: str, count: int) -> bytes:
    """``write -s FILE``: the file's bytes, repeated as needed to fill ``count`` bytes."""
    try:
        with open(source, "rb") as f:
            data = f.read(count)
    except OSError as exc:
        raise session.fail(f"{source}: {exc.strerror}", stderr=True) from None
    if not data:                        # qemu-io refuses an empty file even for a zero-length write
        raise session.fail(f"{source}: file is empty", stderr=True)
    return (data * (count // len(data) + 1))[:count]


async def _write(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["write"]
    opts, operands = _getopt(name, args, "bcCfnpP:qs:uz")
    flags: set[str] = set()
    pattern = _DEFAULT_WRITE_PATTERN
    source: str | None = None
    for opt in opts:
        session.check(cmd, opt)
        flags.add(opt.letter)
        if opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
        elif opt.letter == "s":
            source = opt.arg
    if len(operands) != 2:
        raise session.usage(cmd)
    zero = "z" in flags
    if "n" in flags and not zero:
        raise session.fail("-n requires -z to be specified")
    if "u" in flags and not zero:
        raise session.fail("-u requires -z to be specified")
    if "b" in flags and zero:
        raise session.fail("-b and -z cannot be specified at the same time")
    if zero + ("P" in flags) + ("s" in flags) > 1:
        raise session.fail("Only one of -z, -P, and -s can be specified at the same time")
    offset = session.num(operands[0])
    count = session.num(operands[1])
    if count > MAX_REQUEST and "n" not in flags:
        # qemu-io quirk: says "without -n" even for plain writes, where -n is refused
        raise session.fail(f"length cannot exceed {MAX_REQUEST} without -n, given {operands[1]}")
    if "b" in flags or "c" in flags:
        for what, value in (("offset", offset), ("count", count)):
            if value % 512:
                raise session.fail(f"{value} is not a sector-aligned value for '{what}'")
    data = b""
    if not zero:
        data = _fill(session, source, count) if source is not None else bytes([pattern]) * count
    disk = session.open_disk
    fua = "f" in flags or session.fua
    # -n (no slow fallback for -z) has no aioblock equivalent: write_zeroes always may fall back
    t0 = time.perf_counter()
    try:
        if "b" in flags:
            raise session.fail("write failed: Operation not supported")     # no VM state in aioblock
        if zero:                        # qemu-io quirk: -z -c is accepted, and -z wins
            await disk.write_zeroes(offset, count, may_unmap="u" in flags, fua=fua)
        elif "c" in flags:
            await disk.write_compressed(offset, data)
        else:
            await disk.write(offset, data, fua=fua)
    except _IO_ERRORS as exc:
        raise _io_failure(session, "write", exc) from None
    _done(session, "wrote", offset, count, time.perf_counter() - t0, flags)
    return True


async def _writev(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["writev"]
    opts, operands = _getopt(name, args, "CfqP:")
    flags: set[str] = set()
    pattern = _DEFAULT_WRITE_PATTERN
    for opt in opts:
        session.check(cmd, opt)
        flags.add(opt.letter)
        if opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
    if len(operands) < 2:
        raise session.usage(cmd)
    offset = session.num(operands[0])
    count = _lengths(session, operands[1:])
    t0 = time.perf_counter()
    try:
        await session.open_disk.write(offset, bytes([pattern]) * count, fua="f" in flags or session.fua)
    except _IO_ERRORS as exc:
        raise _io_failure(session, "writev", exc) from None
    _done(session, "wrote", offset, count, time.perf_counter() - t0, flags)
    return True


def _aio_write(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["aio_write"]
    opts, operands = _getopt(name, args, "CfiqP:uz")
    flags: set[str] = set()
    pattern = _DEFAULT_WRITE_PATTERN
    for opt in opts:
        session.check(cmd, opt)
        flags.add(opt.letter)
        if opt.letter == "P":
            assert opt.arg is not None
            pattern = session.pattern(opt.arg)
        elif opt.letter == "i":
            session.out("injecting invalid write request")      # qemu-io quirk: see aio_read -i
            return True
    if len(operands) < 2:
        raise session.usage(cmd)
    zero = "z" in flags                 # qemu-io quirk: -z with -P is accepted, and -z wins
    if "u" in flags and not zero:
        raise session.fail("-u requires -z to be specified")
    if zero and len(operands) > 2:
        raise session.fail("-z supports only a single length parameter")
    offset = session.num(operands[0])
    # qemu-io quirk: with -z the length is not checked against the maximum request size
    count = session.num(operands[1]) if zero else _lengths(session, operands[1:])
    disk = session.open_disk
    fua = "f" in flags or session.fua
    may_unmap = "u" in flags
    data = b"" if zero else bytes([pattern]) * count

    async def request() -> None:
        t0 = time.perf_counter()
        try:
            if zero:
                await disk.write_zeroes(offset, count, may_unmap=may_unmap, fua=fua)
            else:
                await disk.write(offset, data, fua=fua)
        except _IO_ERRORS as exc:
            session.out(f"aio_write failed: {strerror(exc)}")
            return
        # qemu-io quirk: for aio_write -z qemu-io never records the start time, so its statistics measure
        # from the monotonic clock's zero (the time since boot); we print the same figure
        _done(session, "wrote", offset, count, time.monotonic() if zero else time.perf_counter() - t0, flags)

    session.start(request())
    return True


async def _aio_flush(session: Session, name: str, args: list[str]) -> bool:
    await session.wait_aio()
    return True


# ---- discard, flush, truncate, length, info, map, alloc ------------------------------------------------------

async def _discard(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["discard"]
    opts, operands = _getopt(name, args, "Cq")
    flags: set[str] = set()
    for opt in opts:
        session.check(cmd, opt)
        flags.add(opt.letter)
    if len(operands) != 2:
        raise session.usage(cmd)
    offset = session.num(operands[0])
    count = session.num(operands[1])
    if count > MAX_REQUEST:
        raise session.fail(f"length cannot exceed {MAX_REQUEST}, given {operands[1]}")
    t0 = time.perf_counter()
    try:
        await session.open_disk.discard(offset, count)
    except _IO_ERRORS as exc:
        raise _io_failure(session, "discard", exc) from None
    _done(session, "discard", offset, count, time.perf_counter() - t0, flags)
    return True


async def _flush(session: Session, name: str, args: list[str]) -> bool:
    if session.unsafe:
        return True
    try:
        await session.open_disk.flush()
    except _IO_ERRORS:
        return False                    # qemu-io prints nothing when flush fails; only the exit status says so
    return True


_PREALLOC = ("off", "metadata", "falloc", "full")


async def _truncate(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["truncate"]
    opts, operands = _getopt(name, args, "m:")
    mode = "off"
    for opt in opts:
        session.check(cmd, opt)
        assert opt.arg is not None
        if opt.arg not in _PREALLOC:
            raise session.fail(f"{PROG}: Invalid preallocation mode '{opt.arg}'", stderr=True)
        mode = opt.arg
    if not operands:
        raise session.usage(cmd)        # qemu-io quirk: qemu-io 7.2 crashes (SIGSEGV) here; we print the usage
    size = session.num(operands[0])     # qemu-io quirk: further operands are ignored
    disk = session.open_disk
    if mode == "metadata":
        raise session.fail(f"{PROG}: Unsupported preallocation mode: metadata", stderr=True)
    try:
        old = disk.size
        await disk.truncate(size)
        # preallocation through the public API: "full" writes zeroes, "falloc" allocates without unmapping
        if size > old and mode == "full":
            chunk = bytes(min(size - old, 1 << 20))
            for pos in range(old, size, len(chunk)):
                await disk.write(pos, chunk[:min(len(chunk), size - pos)])
        elif size > old and mode == "falloc":
            await disk.write_zeroes(old, size - old, may_unmap=False)
    except _IO_ERRORS as exc:
        text = exc.message if isinstance(exc, AioblockError) else strerror(exc)
        raise session.fail(f"{PROG}: {text}", stderr=True) from None
    return True


def _length(session: Session, name: str, args: list[str]) -> bool:
    session.out(cvtstr(session.open_disk.size))
    return True


async def _info(session: Session, name: str, args: list[str]) -> bool:
    disk = session.open_disk
    info = await disk.info()
    vm_state = disk.vm_state_offset
    out = [f"format name: {info.format}", f"cluster size: {cvtstr(info.cluster_size or 0)}",
           f"vm state offset: {cvtstr(vm_state)}"]
    if info.format_specific:
        out.append("Format specific information:")
        for key, value in info.format_specific.items():
            _format_specific(value, key, 1, out)
    session.out(*out)
    return True


async def _map(session: Session, name: str, args: list[str]) -> bool:
    """Runs allocated in the top image itself vs not (as qemu-io: backing layers do not count), with guest
    offsets (not host ones)."""
    runs: list[tuple[int, int, bool]] = []
    try:
        async for entry in session.open_disk.map():
            if not entry.length:
                continue
            present = entry.present and entry.depth == 0
            if runs and runs[-1][2] == present and runs[-1][0] + runs[-1][1] == entry.start:
                start, length, _ = runs[-1]
                runs[-1] = (start, length + entry.length, present)
            else:
                runs.append((entry.start, entry.length, present))
    except _IO_ERRORS as exc:
        raise session.fail(f"Failed to get allocation status: {strerror(exc)}", stderr=True) from None
    session.out(*(f"{cvtstr(length)} (0x{length:x}) bytes {'    allocated' if present else 'not allocated'} "
                  f"at offset {cvtstr(start)} (0x{start:x})" for start, length, present in runs))
    return True


async def _alloc(session: Session, name: str, args: list[str]) -> bool:
    """Bytes allocated in the top image itself (not its backing chain) within the range; the range stops at
    the end of the image."""
    offset = session.num(args[0])
    count = session.num(args[1]) if len(args) > 1 else 512
    disk = session.open_disk
    remaining = max(0, min(count, disk.size - offset))
    pos, allocated = offset, 0
    try:
        while remaining:
            entry = await disk.block_status(pos, remaining)
            if entry.present and entry.depth == 0:
                allocated += entry.length
            pos += entry.length
            remaining -= entry.length
    except _IO_ERRORS as exc:
        raise session.fail(f"is_allocated failed: {strerror(exc)}") from None
    session.out(f"{allocated}/{pos - offset} bytes allocated at offset {cvtstr(offset)}")
    return True


# ---- session control -----------------------------------------------------------------------------------------

def _help(session: Session, name: str, args: list[str]) -> bool:
    if not args:
        session.out(*(cmd.usage_line() for cmd in sorted(COMMANDS, key=lambda c: c.name)), "",
                    "Use 'help commandname' for extended help.")
        return True
    cmd = COMMANDS_BY_NAME.get(args[0])
    if cmd is None:
        raise session.fail(f"command {args[0]} not found")
    session.out(cmd.usage_line(args[0]))          # qemu-io shows the name as typed (an alias stays an alias)
    if cmd.help:
        session.out("", *cmd.help.splitlines(), "")
    return True


def _quit(session: Session, name: str, args: list[str]) -> bool:
    session.quit = True
    return True


def _sigraise(session: Session, name: str, args: list[str]) -> bool:
    number = session.num(args[0])
    if number > _NSIG:
        raise session.fail(f"signal argument '{args[0]}' is too large to be a valid signal")
    session.stdout.flush()
    session.stderr.flush()
    if number in _QEMU_IO_BLOCKED or number == 0:
        return True                     # blocked or ignored in qemu-io: no effect there either
    with contextlib.suppress(OSError, ValueError):
        signal.signal(number, signal.SIG_DFL)       # Python handles SIGINT and ignores SIGXFSZ: undo that
    with contextlib.suppress(OSError, ValueError):  # not a signal this system can raise: raise(3) fails quietly
        signal.raise_signal(number)
    return True


async def _sleep(session: Session, name: str, args: list[str]) -> bool:
    ms = _c_long(args[0])
    if ms is None or ms < 0:
        raise session.fail(f"{args[0]} is not a valid number")
    # qemu-io quirk: absurd values overflow its timer arithmetic and return at once; so do we
    if ms < 1 << 43:
        await asyncio.sleep(ms / 1000)
    return True


def _abort(session: Session, name: str, args: list[str]) -> bool:
    session.stdout.flush()
    session.stderr.flush()
    os.abort()


async def _close(session: Session, name: str, args: list[str]) -> bool:
    await session.close()
    return True


async def _open(session: Session, name: str, args: list[str]) -> bool:
    cmd = COMMANDS_BY_NAME["open"]
    opts, operands = _getopt(name, args, "rsCnkt:d:o:U")
    read_only = False
    cache = "writeback"
    options: dict[str, str] = {}
    for opt in opts:
        session.check(cmd, opt)
        if opt.letter == "r":
            read_only = True
        elif opt.letter == "n":
            cache = "none"
        elif opt.letter == "t":
            assert opt.arg is not None
            if opt.arg not in CACHE_MODES:
                raise session.fail(f"{PROG}: Invalid cache option: {opt.arg}", stderr=True)
            cache = opt.arg
        elif opt.letter == "o":
            try:
                options.update(parse_options([opt.arg or ""]))
            except InvalidOptionError as exc:
                raise session.fail(f"{PROG}: {exc.message}", stderr=True) from None
        elif opt.letter in "sCkd":
            raise session.fail(f"{PROG}: open -{opt.letter} is not supported by aioblock", stderr=True)
    if len(operands) != 1:
        raise session.usage(cmd)
    if session.disk is not None:
        raise session.fail(f"{PROG}: file open already, try 'help close'", stderr=True)
    fmt = options.pop("driver", None)
    path = operands[0]
    mode, fua, unsafe = CACHE_MODES[cache]
    try:
        session.disk = await api.open(path, fmt, read_only=read_only, engine=session.engine, cache=mode,
                                      options=options or None)
    except AioblockError as exc:
        raise session.fail(f"{PROG}: can't open device {path}: {exc.message}", stderr=True) from None
    session.fua, session.unsafe = fua, unsafe
    return True


_READ_HELP = """\
 Reads LEN bytes at OFF and reports how long it took.
 -b  read from the VM state (not supported by aioblock)
 -C  print the statistics as one comma-separated line
 -l  with -P: how many bytes to check (default: to the end)
 -p  ignored (compatibility)
 -P  check that every byte read equals PATTERN
 -q  print nothing but errors
 -s  with -P: where in the buffer checking starts
 -v  print the data as a hex dump"""

_WRITE_HELP = """\
 Writes LEN bytes at OFF, filled with 0xcd unless told otherwise.
 -b  write to the VM state (not supported by aioblock)
 -c  write compressed clusters (formats with compression only)
 -C  print the statistics as one comma-separated line
 -f  Force Unit Access: the data is durable when the write completes
 -n  with -z: accepted; aioblock always may fall back to writing zeroes
 -p  ignored (compatibility)
 -P  fill the buffer with PATTERN
 -q  print nothing but errors
 -s  fill the buffer from FILE (repeated as needed)
 -u  with -z: the range may be deallocated
 -z  write zeroes without a data buffer"""

_AIO_HELP = """\
 Starts the request and returns at once; its result is printed when it completes,
 and aio_flush waits for every outstanding request. The command succeeds once the
 request is started, whatever its outcome."""


COMMANDS: tuple[Command, ...] = (
    Command("abort", _abort, "simulate a program crash using abort(3)", needs_file=False),
    Command("aio_flush", _aio_flush, "completes all outstanding aio requests"),
    Command("aio_read", _aio_read, "asynchronously reads a number of bytes", "[-Ciqv] [-P pattern] off len [len..]",
            2, -1, help=_AIO_HELP + "\n -C, -P, -q, -v as for read; -i prints a notice and does nothing"),
    Command("aio_write", _aio_write, "asynchronously writes a number of bytes",
            "[-Cfiquz] [-P pattern] off len [len..]", 2, -1, writes=True,
            help=_AIO_HELP + "\n -C, -f, -P, -q, -u, -z as for write; -i prints a notice and does nothing"),
    Command("alloc", _alloc, "checks if offset is allocated in the file", "offset [count]", 1, 2, altname="a"),
    Command("close", _close, "close the current open file", altname="c"),
    Command("discard", _discard, "discards a number of bytes at a specified offset", "[-Cq] off len", 2, -1,
            altname="d", writes=True,
            help=" Tells the image that the range is unused.\n -C, -q as for read"),
    Command("flush", _flush, "flush all in-core file state to disk", altname="f"),
    Command("help", _help, "help for one or all commands", "[command]", 0, 1, altname="?", needs_file=False),
    Command("info", _info, "prints information about the current file", altname="i"),
    Command("length", _length, "gets the length of the current file", altname="l"),
    Command("map", _map, "prints the allocated areas of a file", ""),        # qemu-io quirk: "map  --"
    Command("open", _open, "open the file specified by path",
            "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", 1, -1, altname="o", needs_file=False,
            help=" Opens an image. -r read-only, -n or -t none: no host cache, -t CACHE a cache mode,\n"
                 " -o driver=FMT,... options, -U accepted (aioblock takes no locks)."),
    Command("quit", _quit, "exit the program", altname="q", needs_file=False),
    Command("read", _read, "reads a number of bytes at a specified offset",
            "[-abCqv] [-P pattern [-s off] [-l len]] off len", 2, -1, altname="r", help=_READ_HELP),
    Command("readv", _readv, "reads a number of bytes at a specified offset", "[-Cqv] [-P pattern] off len [len..]",
            2, -1, help=" Like read, with the length given as several parts."),
    Command("sigraise", _sigraise, "raises a signal", "signal", 1, 1, needs_file=False,
            help=" Raises the signal given by number in this process (9 kills it at once)."),
    Command("sleep", _sleep, "waits for the given value in milliseconds", None, 1, 1,     # quirk: no args shown
            needs_file=False),
    Command("truncate", _truncate, "truncates the current file at the given offset", "[-m prealloc_mode] off", 1,
            3, altname="t", writes=True),
    Command("write", _write, "writes a number of bytes at a specified offset",
            "[-bcCfnquz] [-P pattern | -s source_file] off len", 2, -1, altname="w", writes=True,
            help=_WRITE_HELP),
    Command("writev", _writev, "writes a number of bytes at a specified offset", "[-Cfq] [-P pattern] off len [len..]",
            2, -1, writes=True, help=" Like write, with the length given as several parts."),
)

COMMANDS_BY_NAME: dict[str, Command] = {
    **{c.altname: c for c in COMMANDS if c.altname}, **{c.name: c for c in COMMANDS}}


# ---- the subcommand ------------------------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    p = sub.add_parser("io", help="run qemu-io commands on an image (qemu-io)",
                       description="Run qemu-io commands on an image; without -c, read them from stdin.")
    p.add_argument("-f", "--format", dest="fmt", help="image format (probed when omitted)")
    p.add_argument("-r", "--read-only", action="store_true", help="open the image read-only")
    p.add_argument("-t", "--cache", dest="cache", default="writeback",
                   help="cache mode: writeback (default), none, writethrough, directsync, unsafe")
    p.add_argument("-n", "--nocache", dest="cache", action="store_const", const="none",
                   help="no host cache (O_DIRECT); short for -t none")
    p.add_argument("--engine", choices=("uring", "sync", "threads"), help="I/O engine (default: see README)")
    p.add_argument("-i", "--aio", dest="aio", help="qemu-io's AIO mode: io_uring or threads (as --engine)")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility; no effect")
    p.add_argument("-c", "--cmd", dest="commands", action="append", default=[], metavar="CMD",
                   help="run a command (repeatable); without any, commands are read from stdin")
    p.add_argument("filename", nargs="?", help="the image (without it, only 'open' and 'help' are useful)")
    p.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Open the image (errors go to the CLI framework: ``aioblock: FILE: message``), run the ``-c`` commands or
    the lines of stdin, wait for outstanding aio requests, close. 1 if any command failed, else 0."""
    engine: str | None = args.engine
    if args.aio is not None:
        if args.aio not in _AIO_MODES:
            raise InvalidOptionError(f"Invalid aio option: {args.aio} (aioblock supports io_uring and threads)")
        engine = _AIO_MODES[args.aio]
    cache, fua, unsafe = cache_mode(args.cache)
    disk = None
    if args.filename is not None:
        disk = await api.open(args.filename, args.fmt, read_only=args.read_only, engine=engine, cache=cache)
    session = Session(disk, engine, fua=fua, unsafe=unsafe)
    failed = False
    try:
        lines: Iterator[str] | None = iter(args.commands) if args.commands else None
        while not session.quit:
            if lines is not None:
                line = next(lines, None)
            else:
                line = await _prompt(session)
            if line is None:
                break
            if not await session.execute(line):
                failed = True
    finally:
        try:
            await session.close()
        finally:
            session.stdout.flush()
    return 1 if failed else 0


async def _prompt(session: Session) -> str | None:
    """One line from stdin after qemu-io's prompt (printed even when stdin is not a terminal, as qemu-io
    does); the read runs in a thread so that aio requests keep completing meanwhile. None at end of input."""
    session.stdout.write(PROMPT)
    session.stdout.flush()
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        return None
    return line[:-1] if line.endswith("\n") else line
