"""Teaching: run a teacher once over a shard set and store its outputs beside each sample.

    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits
    add_teacher_logits(TeacherPassConfig("data/", [TeacherSpec("t.pth", "resnet50")], out="data-kd/", views=8))

Modules: config (what to do), teachers (checkpoints -> models, ensembles), compute (DALI views ->
logits for one shard), members (outputs <-> .npy members), state (destination, resume, manifest),
h5 (HDF5 export/import), add_logits (the pass itself), cli (the `kdkit add-teacher-logits` parser).
"""
from kdkit.teach.config import TeacherPassConfig, TeacherSpec

__all__ = ["TeacherPassConfig", "TeacherSpec", "SplitReport", "add_teacher_logits", "format_report"]


def __getattr__(name: str):
    # lazily: the pass pulls in torch, and `kdkit --help` imports this package for its parser
    if name in ("SplitReport", "add_teacher_logits", "format_report"):
        from kdkit.teach import add_logits

        return getattr(add_logits, name)
    raise AttributeError(f"module 'kdkit.teach' has no attribute {name!r}")
