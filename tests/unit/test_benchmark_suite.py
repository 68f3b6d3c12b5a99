"""Benchmark suites: parsing, the cross product, excludes, the quick subset, every error, the shipped suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioblock.benchmark.suite import Cell, Suite, load_suite, parse_suite
from aioblock.errors import InvalidOptionError

SUITES = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"

BASE = """
name = "t"
repetitions = 3
requests = 1000

[targets]
engines = ["default", "sync"]
loops = ["uvloop"]
peers = ["qemu-img-threads", "fio-io_uring"]

[matrix]
formats = ["raw", "qcow2"]
depths = [1, 8]
caches = ["writeback"]
locations = ["tmpfs"]
size = "64M"

[[workloads]]
name = "r"
kind = "read"

[[workloads]]
name = "s"
kind = "read"
pattern = "strided"
step = "64k"
"""


def parse(text: str, **kw: bool) -> Suite:
    return parse_suite(text, "t.toml", **kw)


def cells(suite: Suite, **match: object) -> list[Cell]:
    return [c for c in suite.cells if all(getattr(c, k) == v for k, v in match.items())]


def test_cross_product_and_targets() -> None:
    s = parse(BASE)
    assert s.name == "t" and s.repetitions == 3 and not s.quick
    assert len(s.cells) == 2 * 2 * 2           # workloads x formats x depths
    assert len({c.key for c in s.cells}) == len(s.cells)
    raw = cells(s, workload="r", format="raw", depth=8)[0]
    assert raw.targets == ("aioblock-default-uvloop", "aioblock-sync-uvloop", "qemu-img-threads", "fio-io_uring")
    qcow2 = cells(s, workload="r", format="qcow2", depth=8)[0]
    assert "fio-io_uring" not in qcow2.targets                     # fio: raw files only
    assert raw.step == raw.block_size == 4096 and raw.requests == 1000 and raw.duration is None
    strided = cells(s, workload="s")[0]
    assert strided.step == 65536 and strided.pattern == "strided"
    assert s.targets[:2] == ("aioblock-default-uvloop", "aioblock-sync-uvloop")


def test_defaults_and_duration() -> None:
    s = parse('[[workloads]]\nname = "r"\nkind = "read"\n')
    (c,) = s.cells
    assert (c.format, c.block_size, c.depth, c.cache, c.location, c.size) == ("raw", 4096, 32, "writeback",
                                                                            "tmpfs", 1 << 30)
    assert c.duration == 0.5 and c.requests is None
    assert s.repetitions == 4
    assert c.targets[0] == "aioblock-default-uvloop" and "fio-psync" in c.targets


def test_workload_overrides_matrix() -> None:
    s = parse(BASE + '\n[[workloads]]\nname = "big"\nkind = "read"\nblock_sizes = ["1M"]\ndepths = [32]\n'
                     'formats = ["qcow2"]\nduration = 0.3\nengines = ["uring"]\npeers = []\n')
    big = cells(s, workload="big")
    assert [(c.format, c.block_size, c.depth, c.duration, c.requests) for c in big] == \
        [("qcow2", 1 << 20, 32, 0.3, None)]
    assert big[0].targets == ("aioblock-uring-uvloop",)


def test_options_and_sparse_fill() -> None:
    s = parse(BASE + '\n[[workloads]]\nname = "l2"\nkind = "read"\nformats = ["qcow2"]\npattern = "strided"\n'
                     'step = "1M"\nfill = "sparse"\nallocate_every = "1M"\n'
                     'options = { l2-cache-size = "1M" }\ncreate_options = { cluster_size = "64k" }\n')
    (c, _) = cells(s, workload="l2")
    assert c.options == (("l2-cache-size", "1M"),) and c.create_options == (("cluster_size", "64k"),)
    assert c.image().fill == "sparse" and c.image().allocate_every == 1 << 20
    # the options do not change the image: two option sets share one file
    assert c.image() == Cell(**{**_fields(c), "options": ()}).image()


def _fields(c: Cell) -> dict[str, object]:
    return {f: getattr(c, f) for f in c.__dataclass_fields__}


def test_alloc_image_is_fresh_and_capped() -> None:
    s = parse(BASE + '\n[[workloads]]\nname = "a"\nkind = "alloc"\npattern = "strided"\nstep = "64k"\n')
    a = cells(s, workload="a")[0]
    assert a.writes and a.image().fill == "empty" and a.max_requests == (64 << 20) // 65536


def test_exclude_cells_and_targets() -> None:
    s = parse(BASE + '\n[[exclude]]\nworkload = "s"\ndepth = 1\n'
                     '\n[[exclude]]\nformat = "raw"\ndepth = [8]\ntarget = "aioblock-sync-uvloop"\n')
    assert not cells(s, workload="s", depth=1)
    assert len(cells(s, workload="s")) == 2
    assert "aioblock-sync-uvloop" not in cells(s, workload="r", format="raw", depth=8)[0].targets
    assert "aioblock-sync-uvloop" in cells(s, workload="r", format="raw", depth=1)[0].targets
    assert "aioblock-sync-uvloop" in cells(s, workload="r", format="qcow2", depth=8)[0].targets


def test_exclude_block_size_by_size_string() -> None:
    s = parse(BASE + '\n[[exclude]]\nworkload = "r"\nblock_size = "4k"\nformat = "qcow2"\n')
    assert not cells(s, workload="r", format="qcow2")


QUICK = BASE + """
[quick]
repetitions = 1
duration = 0.1
workloads = ["r"]
depths = [8]
engines = ["sync"]
peers = ["qemu-img-threads"]
"""


def test_quick_subset() -> None:
    full = parse(QUICK)
    q = parse(QUICK, quick=True)
    assert q.quick and q.repetitions == 1
    assert [(c.workload, c.format, c.depth) for c in q.cells] == [("r", "raw", 8), ("r", "qcow2", 8)]
    assert all(c.duration == 0.1 and c.requests is None for c in q.cells)
    assert all(c.targets == ("aioblock-sync-uvloop", "qemu-img-threads") for c in q.cells)
    assert {c.key for c in q.cells} <= {c.key for c in full.cells}
    assert full.repetitions == 3 and len(full.cells) == 8


@pytest.mark.parametrize(("text", "message"), [
    ("name = [", "invalid TOML"),
    ("bogus = 1\n[[workloads]]\nname='r'\nkind='read'", "suite: unknown key 'bogus'"),
    ("", "no workloads"),
    ("[[workloads]]\nkind='read'", "'name' is required"),
    ("[[workloads]]\nname='a b'\nkind='read'", "may contain only"),
    ("[[workloads]]\nname='r'\nkind='scan'", "'kind' must be one of read, overwrite, alloc"),
    ("[[workloads]]\nname='r'\nkind='read'\nspeed=1", "[[workloads]] #1 'r': unknown key 'speed'"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[workloads]]\nname='r'\nkind='read'", "used twice"),
    ("[[workloads]]\nname='r'\nkind='read'\npattern='strided'", "'step' is required"),
    ("[[workloads]]\nname='r'\nkind='read'\nstep='64k'", "only for pattern"),
    ("[[workloads]]\nname='r'\nkind='read'\npattern='strided'\nstep='4k'", "multiple of the block size larger"),
    ("[[workloads]]\nname='r'\nkind='read'\npattern='strided'\nstep='6k'", "multiple of the block size larger"),
    ("[[workloads]]\nname='r'\nkind='read'\nblock_sizes=['1000']", "multiple of 512"),
    ("[[workloads]]\nname='r'\nkind='read'\nblock_sizes=['4q']", "invalid size"),
    ("[[workloads]]\nname='r'\nkind='read'\nsize='6k'\nblock_sizes=['4k']", "not a multiple of the block size"),
    ("[[workloads]]\nname='r'\nkind='read'\ndepths=[0]", "between 1 and 4096"),
    ("[[workloads]]\nname='r'\nkind='read'\ndepths=[]", "must not be empty"),
    ("[[workloads]]\nname='r'\nkind='read'\ndepths=[1, 1]", "twice"),
    ("[[workloads]]\nname='r'\nkind='read'\ndepths=8", "must be a list"),
    ("[[workloads]]\nname='r'\nkind='read'\nformats=['vmdk']", "'formats' has 'vmdk'"),
    ("[[workloads]]\nname='r'\nkind='read'\ncaches=['directsync']", "'caches' has 'directsync'"),
    ("[[workloads]]\nname='r'\nkind='read'\nlocations=['nfs']", "'locations' has 'nfs'"),
    ("[targets]\nengines=['aio']\n[[workloads]]\nname='r'\nkind='read'", "'engines' has 'aio'"),
    ("[targets]\nloops=['trio']\n[[workloads]]\nname='r'\nkind='read'", "'loops' has 'trio'"),
    ("[targets]\npeers=['dd']\n[[workloads]]\nname='r'\nkind='read'", "'peers' has 'dd'"),
    ("repetitions=0\n[[workloads]]\nname='r'\nkind='read'", "'repetitions' must be between 1"),
    ("repetitions='4'\n[[workloads]]\nname='r'\nkind='read'", "must be an integer"),
    ("requests=10\nduration=1\n[[workloads]]\nname='r'\nkind='read'", "either 'requests' or 'duration'"),
    ("duration=-1\n[[workloads]]\nname='r'\nkind='read'", "'duration' must be between 0 and 3600"),
    ("[[workloads]]\nname='r'\nkind='read'\noptions={l2-cache-size='1M'}", "set formats = [\"qcow2\"]"),
    ("[[workloads]]\nname='r'\nkind='read'\nformats=['qcow2']\noptions={bogus='1'}", "expected qcow2 open"),
    ("[[workloads]]\nname='r'\nkind='read'\nformats=['qcow2']\noptions={l2-cache-size='1,M'}", "may not contain"),
    ("[[workloads]]\nname='r'\nkind='read'\nfill='sparse'", "'allocate_every' is required"),
    ("[[workloads]]\nname='r'\nkind='overwrite'\nfill='sparse'\nallocate_every='1M'", "for read workloads"),
    ("[[workloads]]\nname='r'\nkind='alloc'\nfill='random'", "fresh, empty image"),
    ("[[workloads]]\nname='r'\nkind='read'\nallocate_every='1M'", "needs fill"),
    ("[[workloads]]\nname='r'\nkind='read'\nfill='sparse'\nallocate_every='3M'\nsize='64M'", "must divide"),
    ("[[workloads]]\nname='a'\nkind='alloc'\nsize='1M'\nrequests=1000", "exceed the 1 MiB image"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[exclude]]\nworkload='x'", "matches no cell"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[exclude]]\ntarget='fio-psync'", "at least one key other"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[exclude]]\nworkload='r'\ntarget='x'", "not one of the suite's"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[exclude]]\nspeed=1", "[[exclude]] #1: unknown key 'speed'"),
    ("[[workloads]]\nname='r'\nkind='read'\n[[exclude]]\nworkload='r'", "leave no cell"),
    ("[[workloads]]\nname='r'\nkind='read'\n[cdf]\ndepth=7", "[cdf]: selects no cell"),
    ("workloads = 3", "must be an array of tables"),
    ("[[workloads]]\nname='r'\nkind='read'\n[quick]\nworkloads=['x']", "[quick]: 'workloads' has 'x'"),
    ("[[workloads]]\nname='r'\nkind='read'\n[quick]\ndepths=[4]", "no cell of the full suite uses"),
    ("[[workloads]]\nname='r'\nkind='read'\n[quick]\npeers=['fio-dev']", "which the full suite does not run"),
    ("[[workloads]]\nname='r'\nkind='read'\n[quick]\nspeed=1", "[quick]: unknown key 'speed'"),
])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        parse(text)
    err = info.value
    assert message in err.message, err.message
    assert err.filename == "t.toml"
    assert "\n" not in err.message


def test_quick_needs_a_quick_table() -> None:
    with pytest.raises(InvalidOptionError, match=r"--quick needs a \[quick\] table"):
        parse(BASE, quick=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="cannot read the suite"):
        load_suite(tmp_path / "none.toml")


@pytest.mark.parametrize("name", sorted(p.name for p in SUITES.glob("*.toml")))
@pytest.mark.parametrize("quick", [False, True])
def test_shipped_suites_parse(name: str, quick: bool) -> None:
    s = load_suite(SUITES / name, quick=quick)
    assert s.cells and all(c.targets for c in s.cells)
    assert len({c.key for c in s.cells}) == len(s.cells)
    if quick:
        assert len(s.cells) < len(load_suite(SUITES / name).cells) or s.repetitions < \
            load_suite(SUITES / name).repetitions


def test_default_suite_covers_the_brief() -> None:
    s = load_suite(SUITES / "default.toml")
    kinds = {(c.kind, c.block_size, c.step) for c in s.cells}
    assert {("read", 4096, 4096), ("read", 4096, 65536), ("overwrite", 4096, 4096), ("alloc", 4096, 4096),
            ("alloc", 4096, 65536), ("read", 65536, 65536), ("read", 1 << 20, 1 << 20)} <= kinds
    assert {c.depth for c in s.cells} == {1, 8, 32, 128}
    assert {c.format for c in s.cells} == {"raw", "qcow2", "qed"}
    assert {c.cache for c in s.cells} == {"writeback", "none"}
    assert {c.location for c in s.cells} == {"disk", "tmpfs"}


def test_l2_cache_suite_compares_cache_sizes() -> None:
    s = load_suite(SUITES / "l2-cache.toml")
    sizes = {dict(c.options).get("l2-cache-size") for c in s.cells}
    assert len(sizes) == 2
    assert all(c.format == "qcow2" and c.fill == "sparse" for c in s.cells)
    assert len({c.image() for c in s.cells if c.cache == "writeback"}) == 1      # one image for both sizes
    assert all("qemu-img-threads" in c.targets for c in s.cells)
