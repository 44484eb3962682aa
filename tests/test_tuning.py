"""The tuning table (mora_kernels/tuned.json): validated on load, read by the launchers and by backend="auto", and
merged by ``tune --install``; other tiles than the defaults compute the same result (under the interpreter)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import mora_kernels as mk
from mora_kernels import autotune, ops, reference, tuning
from mora_kernels.core import Geometry, MoRAType

GOOD_ENTRY = {
    "gpu": "NVIDIA H200", "triton": "3.6", "measured": "test",
    "tiles": {"project/many/rope/f32": [128, 64, 16, 8, 2], "dm/dense/b16": [64, 128, 16, 8, 3]},
    "backend": {"dense/bfloat16/many": "cuda", "blockwise/float32/few": "triton"},
}


def table(*entries):
    return {"schema": tuning.SCHEMA, "entries": list(entries)}


def test_shipped_table_is_valid():
    shipped = json.loads(tuning.TABLE_PATH.read_text())
    assert tuning.validate(shipped) is shipped
    assert tuning.load() == shipped


def tiles_of(table: dict) -> dict:
    return table["entries"][0]["tiles"]


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(schema=2), "'schema': 1"),
    (lambda t: t.update(entries={}), "'entries' list"),
    (lambda t: t["entries"].append(copy.deepcopy(t["entries"][0])), "a second entry"),
    (lambda t: t["entries"][0].update(gpu=""), r"entries\[0\]\.gpu"),
    (lambda t: t["entries"][0].update(triton="3.6.0"), r"entries\[0\]\.triton must be 'major.minor'"),
    (lambda t: tiles_of(t).update({"project/huge/rope/f32": [16] * 5}), "unknown key 'project/huge"),
    (lambda t: tiles_of(t).update({"dm/rope/f32": [64, 48, 16, 8, 3]}), "4 powers of two and a positive integer"),
    (lambda t: tiles_of(t).update({"dm/rope/f32": [64, 64, 8, 8, 3]}), "blocks must be 16..256"),
    (lambda t: tiles_of(t).update({"dm/rope/f32": [64, 64, 16, 8]}), "4 powers of two and a positive integer"),
    (lambda t: tiles_of(t).update({"dm/rope/f32": [64, 64, 16, True, 3]}), "4 powers of two and a positive integer"),
    (lambda t: t["entries"][0]["backend"].update({"dense/float64/many": "cuda"}), "unknown key 'dense/float64"),
    (lambda t: t["entries"][0]["backend"].update({"dense/float32/many": "fastest"}), "must be one of"),
    (lambda t: t["entries"][0].update(tiles=[]), "must be objects"),
])
def test_validate_names_the_field(change, message):
    bad = table(copy.deepcopy(GOOD_ENTRY))
    change(bad)
    with pytest.raises(ValueError, match=message):
        tuning.validate(bad, "tuned.json")


@pytest.mark.parametrize("content", [b"", b"[]", b"{not json", b"\xff\xfe", b'{"schema": 1}'])
def test_load_refuses_malformed_files(tmp_path, content):
    path = tmp_path / "tuned.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="tuned.json"):
        tuning.load(path)


@pytest.fixture
def on_h200(monkeypatch):
    """A table with GOOD_ENTRY, Triton 3.6 and an "NVIDIA H200" as every CUDA device (no GPU needed: the lookups
    only read the device's name)."""
    monkeypatch.setattr(tuning, "_TABLE", table(copy.deepcopy(GOOD_ENTRY)))
    monkeypatch.setattr(tuning, "triton_version", lambda: "3.6")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(name="NVIDIA H200"))


def test_tiles_come_from_the_matching_entry(on_h200, monkeypatch):
    cuda = torch.device("cuda")
    assert tuning.tile(cuda, "project", "rope", "f32", "many") == tuning.Tile(128, 64, 16, 8, 2)
    assert tuning.tile(cuda, "dm", "dense", "b16") == tuning.Tile(64, 128, 16, 8, 3)
    # keys the entry lacks, CPU tensors, another Triton version or another GPU: the defaults
    assert tuning.tile(cuda, "project", "rope", "f32", "few") == tuning.DEFAULT_TILES["project/few/rope/f32"]
    assert tuning.tile(torch.device("cpu"), "dm", "dense", "b16") == tuning.DEFAULT_TILES["dm"]
    monkeypatch.setattr(tuning, "triton_version", lambda: "3.8")
    ops.forget_choices()
    assert tuning.tile(cuda, "dm", "dense", "b16") == tuning.DEFAULT_TILES["dm"]
    assert "no measured entry for NVIDIA H200 with Triton 3.8" in tuning.describe(cuda)


def test_default_tiles_per_operand_and_dot_kind():
    """An operand or dot kind with its own default (where the shared tile spilled) gets it; the others get the
    shared one."""
    cpu = torch.device("cpu")
    assert tuning.tile(cpu, "project", "dense", "tf32", "few") == tuning.DEFAULT_TILES["project/few/tf32"]
    assert tuning.tile(cpu, "project", "rope", "rb16", "few") == tuning.DEFAULT_TILES["project/few/rb16"]
    assert tuning.tile(cpu, "project", "gather", "b16", "few") == tuning.DEFAULT_TILES["project/few"]
    assert tuning.tile(cpu, "dm", "gather", "tf32") == tuning.DEFAULT_TILES["dm/tf32"]
    assert tuning.tile(cpu, "project", "dense", "f32", "few") == tuning.DEFAULT_TILES["project/few"]
    # an operand kind with its own default comes before its dot kind's and the shared one
    assert tuning.tile(cpu, "project", "rope", "f32", "few") == tuning.DEFAULT_TILES["project/few/rope/f32"]
    assert tuning.tile(cpu, "project", "gather", "f32", "few") == tuning.DEFAULT_TILES["project/few"]
    assert tuning.tile(cpu, "project", "gather", "tf32", "few") == tuning.DEFAULT_TILES["project/few/gather/tf32"]
    assert tuning.tile(cpu, "project", "rope", "f32", "many") == tuning.DEFAULT_TILES["project/many"]
    assert tuning.tile(cpu, "dm", "gather", "f32") == tuning.DEFAULT_TILES["dm/gather/f32"]
    # the mixed kernels keep the shared keys
    assert tuning.tile(cpu, "project", "rope", "b16", "few", operand_defaults=False) == tuning.DEFAULT_TILES[
        "project/few"]
    assert tuning.tile(cpu, "dm", "gather", "f32", operand_defaults=False) == tuning.DEFAULT_TILES["dm"]
    assert tuning.tile(cpu, "project", "gather", "tf32", "many") == tuning.DEFAULT_TILES["project/many"]
    assert tuning.tile(cpu, "dm", "rope", "b16") == tuning.DEFAULT_TILES["dm"]
    assert len({tuning.DEFAULT_TILES[k] for k in ("project/few", "project/few/tf32", "project/few/rb16")}) == 3


def test_auto_backend_follows_the_measured_choice(on_h200, monkeypatch):
    monkeypatch.setattr(ops, "backend_status", lambda name, device=None: (True, "usable (test)"))
    cuda = torch.device("cuda")
    dense, rope = Geometry(64, 64, 16, MoRAType.SHARING), Geometry(64, 64, 16, MoRAType.ROPE)
    assert ops.resolve_backend("auto", cuda, dense, torch.bfloat16, 4096) == "cuda"
    assert ops.resolve_backend("auto", cuda, rope, torch.float32, 8) == "triton"
    # not measured (float16, or few rows): today's choice, Triton
    assert ops.resolve_backend("auto", cuda, dense, torch.float16, 4096) == "triton"
    assert ops.resolve_backend("auto", cuda, dense, torch.bfloat16, 8) == "triton"
    # a measured backend that cannot run here is passed over
    monkeypatch.setattr(ops, "backend_status", lambda name, device=None: (name == "triton", "test"))
    ops.forget_choices()
    assert ops.resolve_backend("auto", cuda, dense, torch.bfloat16, 4096) == "triton"
    assert "measured entry for NVIDIA H200 with Triton 3.6" in tuning.describe(cuda)


def test_choices_are_made_once_per_device_dtype_and_shape_class(on_h200, monkeypatch):
    """Decode calls each layer once per token: the backend choice (the backend's status, the table) and the table
    entry of a device are looked up once per (device, dtype, shape class), not on every call."""
    asked, named = [], []
    monkeypatch.setattr(ops, "backend_status", lambda name, device=None: asked.append(name) or (True, "test"))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: named.append(device) or SimpleNamespace(name="NVIDIA H200"))
    cuda0, dense = torch.device("cuda", 0), Geometry(64, 64, 16, MoRAType.SHARING)
    for _ in range(3):
        assert ops.resolve_backend("auto", cuda0, dense, torch.bfloat16, 4096) == "cuda"
        assert tuning.tile(cuda0, "dm", "dense", "b16") == tuning.Tile(64, 128, 16, 8, 3)
    assert asked == ["cuda"] and len(named) == 1
    # another shape class (few rows) or dtype is its own choice, made once as well
    for _ in range(2):
        assert ops.resolve_backend("auto", cuda0, dense, torch.bfloat16, 8) == "triton"
        assert ops.resolve_backend("auto", cuda0, dense, torch.float16, 4096) == "triton"
    assert asked == ["cuda", "triton", "triton"] and len(named) == 1
    # "cuda" without an index is whichever GPU is current: asked every time
    for _ in range(2):
        ops.resolve_backend("auto", torch.device("cuda"), dense, torch.bfloat16, 4096)
    assert asked[3:] == ["cuda", "cuda"]
    # forgotten: asked again
    ops.forget_choices()
    assert ops.resolve_backend("auto", cuda0, dense, torch.bfloat16, 4096) == "cuda"
    assert asked[5:] == ["cuda"] and len(named) == 4


def test_an_explicit_backend_is_checked_once_per_device(monkeypatch):
    """backend="triton" asks the backend whether it can run once (here the interpreter on CPU), then remembers."""
    from mora_kernels import triton_mora

    seen = []
    status = triton_mora.status
    monkeypatch.setattr(triton_mora, "status", lambda device: seen.append(device) or status(device))
    layer = mk.MoRALinear(torch.nn.Linear(32, 24), r=4, mora_type=6, backend="triton")
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)
    assert len(seen) == 1


def test_describe_without_a_gpu():
    assert "none applies on cpu" in tuning.describe("cpu")


def test_tuned_tiles_reach_the_kernels():
    """A table entry's tiles become the launches' constexprs and num_warps / num_stages (what ``kernels`` compiles)."""
    diagnostics = pytest.importorskip("mora_kernels.diagnostics")
    launches = diagnostics.launch_variants("defaults", {"project/many/rope/f32": [128, 64, 16, 8, 2]})
    few = {tuning.default_tile("project", "rope", "f32", "few", aligned).block_t for aligned in (False, True)}
    rope_many = [(c, w, s) for k, sig, c, w, s, _ in launches if k.__name__ == "_project_kernel" and c["A_MODE"] == 2
                 and c["PRECISION"] == "tf32x3" and c["BLOCK_T"] not in few]
    assert rope_many and all((c["BLOCK_T"], c["BLOCK_N"], c["BLOCK_K"], w, s) == (128, 64, 16, 8, 2)
                             for c, w, s in rope_many)
    assert tuning.OVERRIDES == {}  # restored


@pytest.mark.parametrize("key,tile", [
    ("project/many/dense/f32", tuning.Tile(128, 64, 16, 8, 3)),
    ("project/few/rope/f32", tuning.Tile(16, 64, 64, 4, 3)),
    ("dm/rope/f32", tuning.Tile(32, 32, 32, 4, 3)),
    ("project/many/gather/f32", tuning.Tile(64, 128, 16, 8, 2)),
])
def test_other_tiles_compute_the_same(key, tile, monkeypatch):
    """The sweep's candidates are tiles of the same maths: under the interpreter a candidate's forward and backward
    equal the float64 reference as closely as the default tile's (float32 bound: 1e-5 relative for these sizes)."""
    pytest.importorskip("triton")
    from mora_kernels import mora

    t = {"dense": 1, "rope": 6, "gather": 7}[key.split("/")[-2]]
    tokens = 3 if "/few/" in key else 70
    torch.manual_seed(0)
    x = torch.randn(tokens, 40, requires_grad=True)
    M = (torch.randn(20, 20) / 5).requires_grad_()
    g = torch.randn(tokens, 36)
    monkeypatch.setitem(tuning.OVERRIDES, key, tile)
    out = mora(x, M, 36, t, scaling=0.5, backend="triton")
    dx, dM = torch.autograd.grad(out, (x, M), g)
    geo = Geometry(40, 36, 20, MoRAType(t))
    want = reference.forward(x.double(), M.double(), geo, None, 0.5)
    want_dx, want_dM = reference.backward(g.double(), x.double(), M.double(), geo, None, 0.5)
    for got, ref in ((out, want), (dx, want_dx), (dM, want_dM)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_install_merges_and_replaces(tmp_path):
    target = tmp_path / "tuned.json"
    target.write_text(json.dumps(table({"gpu": "NVIDIA A100-SXM4-80GB", "triton": "3.6", "tiles": {}},
                                       {**GOOD_ENTRY, "tiles": {}})))
    result = tmp_path / "tune.json"
    result.write_text(json.dumps({"entry": GOOD_ENTRY, "measurements": []}))
    merged = autotune.install(result, target)
    assert [e["gpu"] for e in merged["entries"]] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H200"]
    assert merged["entries"][1]["tiles"] == GOOD_ENTRY["tiles"]
    assert tuning.load(target) == merged


@pytest.mark.parametrize("content", ['{"entry": {"gpu": "x", "triton": "3"}}', '{"measurements": []}', "[1]", "{"])
def test_install_refuses_a_bad_result_and_changes_nothing(tmp_path, content):
    target = tmp_path / "tuned.json"
    target.write_text(json.dumps(table(GOOD_ENTRY)))
    before = target.read_bytes()
    result = tmp_path / "tune.json"
    result.write_text(content)
    with pytest.raises(ValueError, match="tune.json"):
        autotune.install(result, target)
    assert target.read_bytes() == before


def test_tune_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the sweep would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        autotune.run(1.0, tmp_path / "tune.json")
    assert not (tmp_path / "tune.json").exists()
