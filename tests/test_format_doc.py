"""shards/FORMAT.md and kdkit/shards/contract.py must say the same thing."""
from pathlib import Path

from kdkit.shards import contract

DOC = (Path(__file__).resolve().parents[1] / "shards" / "FORMAT.md").read_text()


def test_doc_states_the_contract_constants():
    assert f"version {contract.FORMAT_VERSION}" in DOC
    assert f'"{contract.FORMAT_NAME}"' in DOC
    assert f"`KEY.{contract.IMAGE_EXT}`" in DOC and f"`KEY.{contract.LABEL_EXT}`" in DOC
    assert f"zero-padded to **{contract.LABEL_WIDTH}** digits" in DOC
    assert f"`{contract.DALI_INDEX_VERSION} <number of samples>`" in DOC
    for name in (contract.MANIFEST, contract.SKIP_REPORT, contract.STATE_DIR, contract.TIMM_INFO):
        assert name in DOC, name
    assert contract.tar_name("train", 0) in DOC and contract.index_name("train", 0) in DOC


def test_doc_lists_every_manifest_field():
    man = contract.Manifest("train", [], [], {}, {}, "", "0").to_json()
    for key in man:
        assert f"`{key}`" in DOC, f"manifest field {key} is not documented in shards/FORMAT.md"


def test_doc_names_the_teacher_member_and_its_layout():
    assert f"`KEY.{contract.TEACHER_EXT}`" in DOC
    for ext in contract.LEGACY_TEACHER_EXTS:  # the layout before it, which readers refuse naming --repack
        assert f"KEY.{ext}" in DOC, ext
    assert ", ".join(contract.VIEW_FIELDS) in DOC
    # the documented example is what teacher_layout gives: K = 10 views of top-10 of 1000 classes
    parts = [(p.name, p.dtype, list(p.shape), p.offset) for p in contract.teacher_layout(1000, 10, 10)]
    assert parts == [("values", "<f2", [10, 10], 0), ("indices", "<u2", [10, 10], 200), ("boxes", "<u2", [10, 5], 400)]
    for name, dtype, shape, offset in parts:
        assert f'{{"name": "{name}", "dtype": "{dtype}", "shape": {shape}, "offset": {offset}}}' in DOC, name
