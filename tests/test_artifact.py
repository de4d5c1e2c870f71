import json
import pickle
import random
import struct

import pytest
import torch

from benchmarks.synthetic import random_artifact
from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact, InvalidArtifact
from blocklora.method.merge import LiveMerge
from core_helpers import make_artifact

CFG = AdapterConfig()


@pytest.fixture
def art(tiny_base):
    return make_artifact(tiny_base, CFG, "my-dog", slot=3)


def _header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _with_meta(art: ConceptArtifact, **changes) -> bytes:
    header, payload = _header(art.to_bytes())
    meta = json.loads(header["__metadata__"]["blocklora"])
    meta.update(changes)
    header["__metadata__"]["blocklora"] = json.dumps(meta)
    return _with_header(header, payload)


def test_round_trip_keeps_everything(art, tmp_path):
    path = art.save(tmp_path / "c.safetensors")
    back = ConceptArtifact.load(path)
    assert back.meta == art.meta
    assert all(torch.equal(back.tensors[k], v) for k, v in art.tensors.items())
    assert not list(tmp_path.glob(".*tmp"))


def test_holds_only_owned_rows(art):
    key = next(iter(art.meta.layout))
    m = art.meta.layout[key][0]
    assert art.tensors[f"{key}.lora_B"].shape[0] == len(range(m)[art.rows(key)]) < m


def _bit_flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[20] ^= 0xFF
    return bytes(b)


def _nan(art: ConceptArtifact) -> bytes:
    key = next(k for k in art.tensors if k.endswith("lora_B"))
    t = dict(art.tensors)
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    return ConceptArtifact(art.meta, t).to_bytes()


def _drop_tensor(art: ConceptArtifact) -> bytes:
    t = dict(art.tensors)
    t.pop(next(iter(t)))
    return ConceptArtifact(art.meta, t).to_bytes()


def _wrong_dtype(art: ConceptArtifact) -> bytes:
    header, payload = _header(art.to_bytes())
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I64"
    return _with_header(header, payload)


BAD = {
    "empty": (lambda a: b"", "too short"),
    "truncated": (lambda a: a.to_bytes()[:-100], "truncated"),
    "bit-flipped header": (lambda a: _bit_flip(a.to_bytes()), "not valid JSON|malformed|corrupted"),
    "huge declared header": (lambda a: struct.pack("<Q", 2**40) + b"{}", "exceeds"),
    "pickle payload": (lambda a: pickle.dumps({"x": 1}), "header|too short|exceeds"),
    "not ours": (lambda a: _with_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                 "no blocklora metadata"),
    "forged slot": (lambda a: _with_meta(a, slot=4), "do not belong to slot 4|needs"),
    "slot beyond K": (lambda a: _with_meta(a, slot=99), "outside"),
    "bad name": (lambda a: _with_meta(a, name="../../etc"), "not allowed"),
    "future format": (lambda a: _with_meta(a, format_version=99), "not supported"),
    "NaN": (_nan, "NaN or Inf"),
    "missing tensor": (_drop_tensor, "missing"),
    "int dtype": (_wrong_dtype, "dtype I64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_refused_with_a_named_reason(art, case):
    make, pattern = BAD[case]
    with pytest.raises(InvalidArtifact, match=pattern):
        ConceptArtifact.from_bytes(make(art))


def test_size_limit_checked_before_parsing(art):
    with pytest.raises(InvalidArtifact, match="the limit is 1,000"):
        ConceptArtifact.from_bytes(art.to_bytes(), max_bytes=1000)


def test_other_base_is_refused_and_nothing_changes(tiny_base, art):
    lm = LiveMerge(tiny_base, CFG)
    forged = ConceptArtifact.from_bytes(_with_meta(art, base_fingerprint="0" * 64))
    w = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    with pytest.raises(InvalidArtifact, match="trained on base 000000000000"):
        lm.add(forged)
    assert lm.live == {} and all(torch.equal(lin.weight, w[k]) for k, lin in lm.targets.items())


def test_other_federation_shape_is_refused(tiny_base, art):
    lm = LiveMerge(tiny_base, AdapterConfig(rank=8))
    with pytest.raises(InvalidArtifact, match="this federation uses"):
        lm.add(art)


def test_fuzz_bit_flips_and_truncations_are_refused_or_load_whole():
    """Every single-bit flip of a tiny artifact, every truncation, and random multi-bit flips:
    each is refused with InvalidArtifact or loads to an artifact that passes every check (a flip in
    a float's low bits is a valid, slightly different concept). Nothing else may escape the loader:
    before issue #16, 65 of 91,876 flips raised a bare ValueError."""
    adapter = AdapterConfig(rank=1, num_slots=2, unet_targets=("to_q",))
    tiny = random_artifact("fz", 1, adapter, "ab" * 32, {"down.attn1.to_q": (4, 3)}, {"text_encoder": 2})
    data = tiny.to_bytes()
    rng = random.Random(0)
    cases = [_flip_bits(data, [i]) for i in range(len(data) * 8)] + [data[:n] for n in range(len(data))]
    cases += [_flip_bits(data, rng.sample(range(len(data) * 8), 3)) for _ in range(max(0, 12_000 - len(cases)))]
    outcomes = {"refused": 0, "loaded": 0}
    for case in cases:
        try:
            art = ConceptArtifact.from_bytes(case)
        except InvalidArtifact:
            outcomes["refused"] += 1
        else:
            assert ConceptArtifact.from_bytes(art.to_bytes()).meta == art.meta
            outcomes["loaded"] += 1
    assert sum(outcomes.values()) >= 10_000 and outcomes["refused"] > 0
    print(f"{len(data)}-byte artifact, {len(cases)} mutations: {outcomes}")


def _flip_bits(data: bytes, bits: list[int]) -> bytes:
    b = bytearray(data)
    for bit in bits:
        b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)
