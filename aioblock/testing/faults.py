"""Fault injection (QEMU's blkdebug) and write recording (QEMU's blklogwrites) for tests.

Two objects:

* :class:`FaultInjector`: the rule set a test builds, plus the injector's state (crashed or not, the
  recording). It is not tied to one open: pass it to any number of ``aioblock.open(..., options={"inject":
  inj})`` calls, one after the other or at once; every node it is given to shares its rules, counters and
  log.
* :class:`FaultNode`: the filter node (``format_name`` "blkdebug") that the node graph puts between the top
  format node and its file when ``inject`` is given. Every request passes through the injector's gate, then
  to the file child unchanged. Named events that format drivers announce with ``self.file.event(name)``
  arrive at :meth:`FaultNode.event`.

Example::

    inj = FaultInjector(record=True)
    inj.fail(op="write", nth=3, errno=errno.ENOSPC)     # the 3rd write fails with ENOSPC
    inj.crash_after_event("l2_update")                   # crash at the next write/flush after "l2_update"
    gate = inj.pause(op="write", range=(0, 4096))        # hold the first write touching [0, 4096)
    async with aioblock.open(path, "qcow2", options={"inject": inj}) as disk:
        task = asyncio.create_task(disk.write(0, data))
        req = await gate.wait_paused()                   # the write is held; other requests go on
        gate.release()
        await task
    log = inj.log                                        # what reached the file, in order

Requests and ops
----------------
The filter sees what the format driver asks of its file (metadata and data I/O, after the backend has split
and aligned the guest's requests), not the guest's requests themselves. A request is one call of the filter
node: ``read`` (pread), ``write`` (pwrite), ``write_zeroes``, ``discard`` (pdiscard), ``flush``,
``truncate`` and ``block_status``. A rule's ``op`` is one of those names, one of the groups ``"modify"``
(write, write_zeroes, discard, truncate and flush: every request that changes the file or makes it durable,
i.e. exactly what the recorder logs; the default) and ``"any"``, or a collection of names and groups.
``range=(start, end)`` restricts a rule to requests whose bytes ``[offset, offset + length)`` overlap
``[start, end)``; flush and truncate have no bytes and never match a range rule. ``where`` is a predicate on
the :class:`Request`.

Rule semantics (stated once, used by every rule kind)
-----------------------------------------------------
* **Arming.** A rule without ``after_event`` is armed as soon as it is added. A rule with
  ``after_event=name`` counts the announcements of ``name`` made after it was added, and is armed by the
  ``event_nth``-th of them (the 1st by default). Once armed, a rule stays armed: later announcements change
  nothing.
* **Counting.** An armed rule *sees* every request that matches its op set, range and predicate, in the
  order the requests arrive at the filter (arrival, not completion, order). Requests seen before arming do
  not count. A request is seen by every matching armed rule, even when another rule fails, drops or holds
  it.
* **Firing.** A rule fires on the ``nth`` request it sees (1 = the first). With ``once=True`` (the default)
  the rule is then retired (removed from the injector). With ``once=False`` (sticky) it fires on the ``nth``
  and on every later request it sees, until :meth:`FaultInjector.remove` or :meth:`FaultInjector.clear`.
* **Outcome.** When several rules fire on one request, every pause rule holds it first (in the order the
  rules were added); then, if the injector crashed meanwhile, the request fails with SimulatedCrashError;
  otherwise the earliest added crash/fail/drop rule decides what happens to it.
* **Actions.** :class:`Fail`: the request fails with ``InjectedFaultError(errno)`` (a ``BlockIOError``) and
  does not reach the file; the injector goes on. :class:`Crash`: the request fails with
  ``SimulatedCrashError``, does not reach the file, and the injector is *crashed*. :class:`Drop`: the
  request reports success but never reaches the file (a lost write; "modify" ops only). :class:`Pause`: the
  request waits until its :class:`PauseHandle` releases it, then goes on. A held request that is cancelled
  leaves the hold without reaching the file, unless the request it belongs to has committed
  (:mod:`aioblock.cancellation`): then it stays held, and goes on when released.
* **Crashed.** Once crashed (a crash rule fired, or :meth:`FaultInjector.crash_now`), every request through
  any node of this injector fails with SimulatedCrashError without reaching the file and without being seen
  by rules; a request that was already at the file when the crash happened fails the same way when the file
  returns (its effect on the file stays, and stays in the log). Events are ignored.
  :meth:`FaultInjector.revive` ends the crashed state (to reopen the image with the same injector).

Recording
---------
With ``injector.record = True`` (or a :class:`Recorder`) every modify request that passed the gate is logged
when it is issued to the file, in issue order, as a :class:`LogEntry` (``seq, op, offset, payload = entry``;
payload is the data of a write, else the length). Completion is marked on the entry: ``status`` "ok" or
"failed", and its place in completion order. A flush entry also records ``covers``: how many entries had
completed when it was issued; the entries it makes durable are the ok ones with ``completion < covers`` (see
:func:`durable_seqs`). Announced events are kept in ``Recorder.events`` as ``(log position, name)``.
:mod:`aioblock.testing.crash` turns a log into crash states.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

from .. import cancellation
from ..driver import BlockDriver, Extent
from ..errors import InjectedFaultError, SimulatedCrashError
from ..io.engine import Engine
from ..node import register_filter

__all__ = [
    "MODIFY_OPS",
    "OPS",
    "Action",
    "Crash",
    "Drop",
    "Fail",
    "FaultInjector",
    "FaultNode",
    "FaultyEngine",
    "LogEntry",
    "Pause",
    "PauseHandle",
    "Recorder",
    "Request",
    "Rule",
    "durable_seqs",
]

#: Every request kind the filter node sees.
OPS: tuple[str, ...] = ("read", "write", "write_zeroes", "discard", "flush", "truncate", "block_status")
#: Requests that change the file or make it durable: what rules match by default and what the recorder logs.
MODIFY_OPS: frozenset[str] = frozenset({"write", "write_zeroes", "discard", "truncate", "flush"})
_GROUPS: dict[str, frozenset[str]] = {"modify": MODIFY_OPS, "any": frozenset(OPS)}
_RANGED_OPS = frozenset({"read", "write", "write_zeroes", "discard", "block_status"})

OpSpec: TypeAlias = str | Collection[str]
T = TypeVar("T")


def _parse_ops(spec: OpSpec) -> frozenset[str]:
    names = [spec] if isinstance(spec, str) else list(spec)
    out: set[str] = set()
    for name in names:
        if name in _GROUPS:
            out |= _GROUPS[name]
        elif name in OPS:
            out.add(name)
        else:
            raise ValueError(f"unknown op {name!r} (choose from {', '.join((*OPS, *_GROUPS))})")
    if not out:
        raise ValueError("a rule needs at least one op")
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Request:
    """One request arriving at a fault node (what rules and ``where`` predicates look at).

    ``offset``/``length``: the byte range (truncate: ``offset`` is the new size, ``length`` 0; flush: 0, 0).
    ``data``: the buffer of a write (read-only view; valid only during the call of the predicate).
    """

    op: str
    offset: int
    length: int
    filename: str = ""
    data: memoryview | None = None
    fua: bool = False
    may_unmap: bool = False

    def overlaps(self, start: int, end: int) -> bool:
        """Whether the request's bytes intersect ``[start, end)`` (never for flush and truncate)."""
        return (self.op in _RANGED_OPS and self.length > 0
                and self.offset < end and start < self.offset + self.length)


# ---- actions -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail the request with ``InjectedFaultError(errno)``; it does not reach the file."""

    errno: int = _errno.EIO

    def __post_init__(self) -> None:
        if self.errno <= 0:
            raise ValueError(f"errno must be positive, not {self.errno}")


@dataclass(frozen=True, slots=True)
class Crash:
    """Fail the request with SimulatedCrashError and crash the injector (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class Drop:
    """Report success without passing the request to the file (a lost write). Modify ops only."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Hold the request until its :class:`PauseHandle` releases it (blkdebug's break/resume)."""


Action: TypeAlias = Fail | Crash | Drop | Pause


# ---- rules -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Rule:
    """When to do what to a request; semantics in the module docstring ("Rule semantics").

    The fields after ``once`` are the rule's state, updated by the injector it was added to: ``armed``,
    ``events_seen`` (announcements of ``after_event`` counted so far), ``seen`` (matching requests seen
    while armed), ``fired`` (times it fired) and ``retired`` (removed: fired once, or removed by hand).
    A rule belongs to one injector.
    """

    action: Action
    op: OpSpec = "modify"
    nth: int = 1
    after_event: str | None = None
    event_nth: int = 1
    range: tuple[int, int] | None = None
    where: Callable[[Request], bool] | None = None
    once: bool = True
    ops: frozenset[str] = field(init=False)
    armed: bool = field(init=False)
    events_seen: int = field(init=False, default=0)
    seen: int = field(init=False, default=0)
    fired: int = field(init=False, default=0)
    retired: bool = field(init=False, default=False)
    handle: PauseHandle | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.ops = _parse_ops(self.op)
        if self.nth < 1 or self.event_nth < 1:
            raise ValueError("nth and event_nth count from 1")
        if self.range is not None and not 0 <= self.range[0] < self.range[1]:
            raise ValueError(f"range must be (start, end) with 0 <= start < end, not {self.range}")
        if isinstance(self.action, Drop) and not self.ops <= MODIFY_OPS:
            raise ValueError("a drop rule may only match modify ops")
        if isinstance(self.action, Crash) and not self.once:
            raise ValueError("a crash rule fires once: a crash stops every later request anyway")
        self.armed = self.after_event is None

    def matches(self, req: Request) -> bool:
        """Whether ``req`` matches the op set, range and predicate (arming and counting aside)."""
        if req.op not in self.ops:
            return False
        if self.range is not None and not req.overlaps(*self.range):
            return False
        return self.where is None or self.where(req)

    def _note_event(self, name: str) -> None:
        if not self.armed and name == self.after_event:
            self.events_seen += 1
            if self.events_seen >= self.event_nth:
                self.armed = True

    def _see(self, req: Request) -> bool:
        """Count ``req`` if it matches; True when the rule fires on it."""
        if self.retired or not self.armed or not self.matches(req):
            return False
        self.seen += 1
        if self.seen >= self.nth:
            self.fired += 1
            return True
        return False


class PauseHandle:
    """Control of a pause rule: wait until it holds a request, then release it.

    ``held`` lists the requests held right now (one for a once rule; any number for a sticky one, which holds
    every matching request until the next :meth:`release`). Like blkdebug's ``wait_break`` / ``resume``.
    A held request is in flight: closing or draining the disk waits for it, so release (or :meth:`remove`)
    before closing.
    """

    def __init__(self, injector: FaultInjector, rule: Rule) -> None:
        self.rule = rule
        self._injector = injector
        self._held: list[tuple[Request, asyncio.Future[None]]] = []
        self._has_held = asyncio.Event()

    @property
    def held(self) -> tuple[Request, ...]:
        return tuple(req for req, _ in self._held)

    @property
    def paused(self) -> bool:
        """Whether a request is held right now."""
        return bool(self._held)

    async def wait_paused(self) -> Request:
        """Wait until a request is held (return at once if one is) and return the first held request.

        Waits forever if the rule never fires: tests should bound the whole test, not this call."""
        while not self._held:
            await self._has_held.wait()
        return self._held[0][0]

    def release(self) -> None:
        """Let every request held right now go on. RuntimeError if none is held (a test bug)."""
        if not self._held:
            raise RuntimeError("release(): no request is paused")
        self._release_all()

    def remove(self) -> None:
        """Retire the rule and release whatever it holds."""
        self._injector.remove(self.rule)

    def _release_all(self) -> None:
        held, self._held = self._held, []
        self._has_held.clear()
        for _, fut in held:
            if not fut.done():
                fut.set_result(None)

    async def _hold(self, req: Request) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (req, fut)
        self._held.append(item)
        self._has_held.set()
        try:
            await cancellation.wait(fut)
        finally:
            if item in self._held:                    # cancelled while held
                self._held.remove(item)
                if not self._held:
                    self._has_held.clear()


# ---- recording ---------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class LogEntry:
    """One modify request that reached the file. Unpacks as ``seq, op, offset, payload``.

    ``seq``: position in the log (issue order). ``op``: write, write_zeroes, discard, flush or truncate.
    ``offset``: byte offset (truncate: the new size; flush: 0). ``length``: bytes (0 for flush and truncate).
    ``data``: a copy of a write's buffer. ``status``: "issued" (still at the file), "ok" or "failed"
    (``error`` says why). ``completion``: the entry's index in completion order (ok entries only).
    ``covers`` (flush): the number of completions before it was issued; the flush makes durable every ok
    entry with ``completion < covers``. A ``fua`` write is durable by itself once ok.
    """

    seq: int
    op: str
    offset: int
    length: int
    data: bytes | None = None
    fua: bool = False
    may_unmap: bool = False
    status: str = "issued"
    error: str | None = None
    completion: int | None = None
    covers: int | None = None

    @property
    def payload(self) -> bytes | int:
        """The data of a write; the length for the other ops (truncate: the new size)."""
        if self.data is not None:
            return self.data
        return self.offset if self.op == "truncate" else self.length

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def modifies(self) -> bool:
        """Whether the entry changes the file's content or size (everything but flush)."""
        return self.op != "flush"

    @property
    def end(self) -> int:
        return self.offset + self.length

    def __iter__(self) -> Iterator[Any]:
        return iter((self.seq, self.op, self.offset, self.payload))

    def __repr__(self) -> str:
        extra = f" covers={self.covers}" if self.op == "flush" else f" {self.offset:#x}+{self.length:#x}"
        return f"<LogEntry {self.seq} {self.op}{extra} {self.status}>"


def durable_seqs(log: Sequence[LogEntry]) -> frozenset[int]:
    """Seqs of the modify entries that survive a power loss at the end of ``log``: those that completed
    before a flush that completed was issued, and completed FUA writes. For a sequential workload these are
    exactly the modify entries before the last completed flush (plus FUA writes after it)."""
    covers = max((e.covers or 0 for e in log if e.op == "flush" and e.ok), default=0)
    return frozenset(e.seq for e in log if e.modifies and e.ok and e.completion is not None
                     and (e.completion < covers or e.fua))


class Recorder:
    """The log of what reached the file (see the module docstring, "Recording").

    ``log`` is one list object for the recorder's lifetime (``clear`` empties it), so a reference taken before
    a workload sees its entries. Only the injector's fault nodes call the ``_issue``/``_done``/``_failed``
    methods.
    """

    def __init__(self) -> None:
        self.log: list[LogEntry] = []
        self.events: list[tuple[int, str]] = []
        self._completions = 0

    def clear(self) -> None:
        """Forget everything recorded (the base image for crash states is then the file as it is now)."""
        del self.log[:]
        del self.events[:]
        self._completions = 0

    def durable(self) -> frozenset[int]:
        """:func:`durable_seqs` of the log so far."""
        return durable_seqs(self.log)

    def _issue(self, req: Request) -> LogEntry:
        entry = LogEntry(len(self.log), req.op, req.offset, req.length,
                         bytes(req.data) if req.data is not None else None, req.fua, req.may_unmap)
        if req.op == "truncate":
            entry.length = 0
        if req.op == "flush":
            entry.covers = self._completions
        self.log.append(entry)
        return entry

    def _done(self, entry: LogEntry) -> None:
        entry.status = "ok"
        entry.completion = self._completions
        self._completions += 1

    def _failed(self, entry: LogEntry, exc: BaseException) -> None:
        entry.status = "failed"
        entry.error = f"{type(exc).__name__}: {exc}"

    def _event(self, name: str) -> None:
        self.events.append((len(self.log), name))


# ---- the injector ------------------------------------------------------------------------------------------


class FaultInjector:
    """A reusable set of fault rules, the crashed state and the optional recording (see the module docstring).

    State is touched only from the event loop, between awaits: no lock.
    """

    def __init__(self, *, record: bool | Recorder = False) -> None:
        self._rules: list[Rule] = []
        self._recorder: Recorder | None = None
        self._crash_reason: str | None = None
        #: Every event announced while not crashed, in order.
        self.events: list[str] = []
        self.record = record

    # ---- recording -----------------------------------------------------------------------------------------

    @property
    def record(self) -> bool:
        """Whether requests are being recorded. Set True to record into a new Recorder (an active one is
        kept), a Recorder to record into it, False to stop (the recorder is dropped)."""
        return self._recorder is not None

    @record.setter
    def record(self, value: bool | Recorder) -> None:
        if isinstance(value, Recorder):
            self._recorder = value
        elif value:
            self._recorder = self._recorder or Recorder()
        else:
            self._recorder = None

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise RuntimeError("recording is off: set injector.record = True first")
        return self._recorder

    @property
    def log(self) -> list[LogEntry]:
        """The recorder's log (the live list). RuntimeError when not recording."""
        return self.recorder.log

    # ---- rules ---------------------------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The active (not retired) rules, in the order they were added."""
        return tuple(self._rules)

    def add(self, rule: Rule) -> Rule:
        """Add a rule built by hand; returns it. A pause rule gets its handle as ``rule.handle``."""
        if rule.retired or rule in self._rules:
            raise ValueError("a rule can be added once")
        if isinstance(rule.action, Pause) and rule.handle is None:
            rule.handle = PauseHandle(self, rule)
        self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Retire ``rule`` now (no error if it already is); a pause rule releases what it holds."""
        if rule in self._rules:
            self._rules.remove(rule)
        rule.retired = True
        if rule.handle is not None:
            rule.handle._release_all()

    def clear(self) -> None:
        """Retire every rule (releasing every held request)."""
        for rule in list(self._rules):
            self.remove(rule)

    def unfired(self) -> list[Rule]:
        """Active rules that have not fired yet (``assert not inj.unfired()`` catches mistyped events)."""
        return [r for r in self._rules if not r.fired]

    def fail(self, *, errno: int = _errno.EIO, op: OpSpec = "modify", nth: int = 1,
             after_event: str | None = None, event_nth: int = 1, range: tuple[int, int] | None = None,
             where: Callable[[Request], bool] | None = None, once: bool = True) -> Rule:
        """Fail the ``nth`` matching request with ``errno`` (blkdebug ``inject-error``)."""
        return self.add(Rule(Fail(errno), op, nth, after_event, event_nth, range, where, once))

    def crash(self, *, op: OpSpec = "modify", nth: int = 1, after_event: str | None = None,
              event_nth: int = 1, range: tuple[int, int] | None = None,
              where: Callable[[Request], bool] | None = None) -> Rule:
        """Crash at the ``nth`` matching request: it and everything after it fail, nothing more reaches the
        file."""
        return self.add(Rule(Crash(), op, nth, after_event, event_nth, range, where, True))

    def drop(self, *, op: OpSpec = "modify", nth: int = 1, after_event: str | None = None, event_nth: int = 1,
             range: tuple[int, int] | None = None, where: Callable[[Request], bool] | None = None,
             once: bool = True) -> Rule:
        """Make the ``nth`` matching request report success without reaching the file."""
        return self.add(Rule(Drop(), op, nth, after_event, event_nth, range, where, once))

    def pause(self, *, op: OpSpec = "modify", nth: int = 1, after_event: str | None = None,
              event_nth: int = 1, range: tuple[int, int] | None = None,
              where: Callable[[Request], bool] | None = None, once: bool = True) -> PauseHandle:
        """Hold the ``nth`` matching request (every one from the ``nth`` on if sticky) until released."""
        rule = self.add(Rule(Pause(), op, nth, after_event, event_nth, range, where, once))
        assert rule.handle is not None
        return rule.handle

    def fail_after_event(self, event: str, *, errno: int = _errno.EIO, op: OpSpec = "modify", nth: int = 1,
                         event_nth: int = 1, once: bool = True) -> Rule:
        """Fail the ``nth`` matching request after the ``event_nth``-th announcement of ``event``."""
        return self.fail(errno=errno, op=op, nth=nth, after_event=event, event_nth=event_nth, once=once)

    def crash_after_event(self, event: str, *, op: OpSpec = "modify", nth: int = 1,
                          event_nth: int = 1) -> Rule:
        """Crash at the ``nth`` matching request after the ``event_nth``-th announcement of ``event``: with
        the defaults, the write or flush the event announced never reaches the file."""
        return self.crash(op=op, nth=nth, after_event=event, event_nth=event_nth)

    def pause_after_event(self, event: str, *, op: OpSpec = "modify", nth: int = 1, event_nth: int = 1,
                          once: bool = True) -> PauseHandle:
        """Hold the ``nth`` matching request after the ``event_nth``-th announcement of ``event``."""
        return self.pause(op=op, nth=nth, after_event=event, event_nth=event_nth, once=once)

    # ---- crash state and events ----------------------------------------------------------------------------

    @property
    def crashed(self) -> bool:
        return self._crash_reason is not None

    def crash_now(self, reason: str = "crash_now()") -> None:
        """Crash the injector at once (requests held by pause rules fail when released)."""
        if self._crash_reason is None:
            self._crash_reason = reason

    def revive(self) -> None:
        """End the crashed state; rules and the recording are kept."""
        self._crash_reason = None

    def announce(self, name: str) -> None:
        """A named event happened (what :meth:`FaultNode.event` calls). Ignored while crashed."""
        if self._crash_reason is not None:
            return
        self.events.append(name)
        if self._recorder is not None:
            self._recorder._event(name)
        for rule in self._rules:
            rule._note_event(name)

    # ---- the gate (called by FaultNode) --------------------------------------------------------------------

    def _check_crashed(self, req: Request) -> None:
        if self._crash_reason is not None:
            raise SimulatedCrashError(f"simulated crash ({self._crash_reason}); {req.op} refused",
                                      filename=req.filename or None)

    async def _admit(self, req: Request) -> bool:
        """Apply the rules to ``req``; False if it is dropped. Raises for fail and crash."""
        self._check_crashed(req)
        fired = [rule for rule in self._rules if rule._see(req)]
        for rule in fired:
            if rule.once:
                self.remove(rule)           # a once rule holds nothing yet: removing it releases nothing
        for rule in fired:
            if rule.handle is not None:
                await rule.handle._hold(req)
        self._check_crashed(req)
        for rule in fired:
            action = rule.action
            if isinstance(action, Crash):
                self._crash_reason = f"{req.op} #{rule.seen} at offset {req.offset}"
                raise SimulatedCrashError(f"simulated crash at {req.op} (offset {req.offset})",
                                          filename=req.filename or None)
            if isinstance(action, Fail):
                message = f"{os.strerror(action.errno)} (injected into {req.op} at offset {req.offset})"
                raise InjectedFaultError(action.errno, message, filename=req.filename or None)
            if isinstance(action, Drop):
                return False
        return True

    async def _through(self, req: Request, call: Callable[[], Coroutine[Any, Any, T]], default: T) -> T:
        """Gate ``req``, log it if recording, run ``call`` (the file's method), mark the outcome."""
        if not await self._admit(req):
            return default
        recorder = self._recorder if req.op in MODIFY_OPS else None
        entry = recorder._issue(req) if recorder is not None else None
        try:
            result = await call()
        except BaseException as exc:
            if entry is not None and recorder is not None:
                recorder._failed(entry, exc)
            raise
        if entry is not None and recorder is not None:
            recorder._done(entry)
        self._check_crashed(req)          # the crash happened while the request was at the file
        return result


# ---- the filter node ---------------------------------------------------------------------------------------


class FaultNode(BlockDriver):
    """Filter node between a format node and its file: every request goes through ``injector``'s rules, then
    to ``file`` unchanged (see the module docstring). Has no state of its own; safe for any concurrency.
    Closing it closes nothing: the node graph closes ``file`` as its child."""

    format_name: ClassVar[str] = "blkdebug"
    is_format: ClassVar[bool] = False

    def __init__(self, file: BlockDriver, injector: FaultInjector) -> None:
        self.file = file
        self._file = file
        self.injector = injector
        self.filename = file.filename
        self.read_only = file.read_only
        self.limits = file.limits

    @property
    def size(self) -> int:
        return self._file.size

    def event(self, name: str) -> None:
        """Where named events arrive: counted by the injector's event rules, then passed down."""
        self.injector.announce(name)
        super().event(name)

    async def pread(self, offset: int, buf: memoryview) -> None:
        req = Request("read", offset, len(buf), self.filename)
        await self.injector._through(req, lambda: self._file.pread(offset, buf), None)

    async def pwrite(self, offset: int, buf: memoryview, *, fua: bool = False) -> None:
        req = Request("write", offset, len(buf), self.filename, buf.toreadonly(), fua)
        await self.injector._through(req, lambda: self._file.pwrite(offset, buf, fua=fua), None)

    async def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                            fua: bool = False) -> None:
        req = Request("write_zeroes", offset, length, self.filename, None, fua, may_unmap)
        await self.injector._through(
            req, lambda: self._file.pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua), None)

    async def pdiscard(self, offset: int, length: int) -> None:
        req = Request("discard", offset, length, self.filename)
        await self.injector._through(req, lambda: self._file.pdiscard(offset, length), None)

    async def flush(self) -> None:
        await self.injector._through(Request("flush", 0, 0, self.filename), self._file.flush, None)

    async def truncate(self, size: int) -> None:
        await self.injector._through(Request("truncate", size, 0, self.filename),
                                     lambda: self._file.truncate(size), None)

    async def block_status(self, offset: int, length: int) -> Extent:
        req = Request("block_status", offset, length, self.filename)
        dummy = Extent(offset, length, True, True, False)     # never returned: block_status cannot be dropped
        return await self.injector._through(req, lambda: self._file.block_status(offset, length), dummy)


register_filter("inject", FaultNode)


class FaultyEngine(Engine):
    """An I/O engine that fails chosen syscalls as the kernel would, passing everything else to a real engine.

    :class:`FaultNode` sits above the file node, so what it injects never reaches the file node's own error
    handling; this sits below it, for tests of what the file node does with the kernel's errors (a writeback
    error reported by fdatasync, an EIO from a read). Install it with ``node.engine = FaultyEngine(node.engine)``
    on a :class:`aioblock.io.file.FileNode`; ``fail(op, errno, times)`` arms it (op: ``pread``, ``pwrite``,
    ``fsync`` or ``fallocate``); ``calls`` counts the calls that reached the real engine."""

    name: ClassVar[str] = "faulty"

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self._armed: dict[str, list[int]] = {}      # op -> [errno, calls still to fail]
        self.calls: dict[str, int] = {"pread": 0, "pwrite": 0, "fsync": 0, "fallocate": 0}

    def fail(self, op: str, errno: int, times: int = 1) -> None:
        if op not in self.calls:
            raise ValueError(f"unknown engine op {op!r}")
        self._armed[op] = [errno, times]

    def _check(self, op: str) -> None:
        armed = self._armed.get(op)
        if armed is not None and armed[1] > 0:
            armed[1] -= 1
            raise OSError(armed[0], os.strerror(armed[0]))
        self.calls[op] += 1

    async def pread(self, fd: int, buf: memoryview, offset: int) -> int:
        self._check("pread")
        return await self.inner.pread(fd, buf, offset)

    async def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        self._check("pwrite")
        return await self.inner.pwrite(fd, buf, offset)

    async def fsync(self, fd: int) -> None:
        self._check("fsync")
        await self.inner.fsync(fd)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._check("fallocate")
        await self.inner.fallocate(fd, mode, offset, length)

    def statistics(self) -> dict[str, Any]:
        return self.inner.statistics()

    async def aclose(self) -> None:
        await self.inner.aclose()
