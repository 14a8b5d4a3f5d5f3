import numpy as np
import pyarrow as pa
import pytest

from echo_stream import motion, schemas
from echo_stream.errors import SchemaError


def _motion_batch(n=3, **over):
    cols = dict(session_id=["s"] * n, seq=np.arange(n), pts=np.arange(n) / 25, frame=np.arange(n),
                window=np.zeros(n, int), motion=np.zeros((n, motion.NUM_CHANNELS), np.float32))
    cols.update(over)
    return cols


def test_every_contract_has_session_seq_pts_and_tensor_columns():
    for c in schemas.CONTRACTS.values():
        assert c.field_names[:3] == ("session_id", "seq", "pts")
        assert any(isinstance(s, schemas.TensorSpec) for _, s in c.fields) or c.name == "TranscriptSegment"


def test_make_batch_roundtrip_uses_fixed_shape_tensor():
    b = schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(motion=np.random.rand(3, 58)))
    assert isinstance(b.schema.field("motion").type, pa.FixedShapeTensorType)
    assert schemas.column(b, "motion").shape == (3, 58)


@pytest.mark.parametrize("field,bad,needle", [
    ("motion", np.zeros((3, 57), np.float32), "shape"),
    ("motion", np.zeros((3, 58), np.float64), None),  # cast to the contract's float32: accepted
])
def test_tensor_shape_checked(field, bad, needle):
    if needle is None:
        schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(**{field: bad}))
        return
    with pytest.raises(SchemaError, match=f"field '{field}'.*{needle}"):
        schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(**{field: bad}))


def test_validate_names_missing_extra_wrong_type_and_nulls():
    good = schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch())
    with pytest.raises(SchemaError, match="field 'frame': missing"):
        schemas.validate(good.drop_columns(["frame"]), schemas.MOTION_WINDOW)
    with pytest.raises(SchemaError, match="field 'bogus': not part"):
        schemas.validate(good.append_column("bogus", pa.array([1, 2, 3])), schemas.MOTION_WINDOW)
    wrong = good.set_column(good.schema.get_field_index("pts"), "pts", pa.array(["a", "b", "c"]))
    with pytest.raises(SchemaError, match="field 'pts': expected type double"):
        schemas.validate(wrong, schemas.MOTION_WINDOW)
    nulls = good.set_column(good.schema.get_field_index("frame"), "frame", pa.array([1, None, 3], pa.int64()))
    with pytest.raises(SchemaError, match="field 'frame': 1 null"):
        schemas.validate(nulls, schemas.MOTION_WINDOW)
    with pytest.raises(SchemaError, match="expected a pyarrow RecordBatch"):
        schemas.validate({"a": 1}, schemas.MOTION_WINDOW)


def test_seq_must_increase_within_a_session_and_pts_be_finite():
    with pytest.raises(SchemaError, match="field 'seq'"):
        schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(seq=[0, 2, 1]))
    # two sessions interleaved: each increasing on its own is fine
    schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(session_id=["a", "b", "b"], seq=[5, 0, 1]))
    with pytest.raises(SchemaError, match="field 'pts'"):
        schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(pts=[0.0, np.nan, 0.1]))


def test_wildcard_shapes_fixed_per_batch():
    img = lambda h, w: schemas.make_batch(schemas.RENDERED_FRAMES, dict(
        session_id=["s"], seq=[0], pts=[0.0], frame=[0], image=np.zeros((1, h, w, 3), np.uint8)))
    assert schemas.column(img(8, 6), "image").shape == (1, 8, 6, 3)
    assert schemas.column(img(4, 4), "image").shape == (1, 4, 4, 3)
    with pytest.raises(SchemaError, match="field 'image'"):
        schemas.make_batch(schemas.RENDERED_FRAMES, dict(
            session_id=["s"], seq=[0], pts=[0.0], frame=[0], image=np.zeros((1, 4, 4, 4), np.uint8)))


def test_concat_and_empty():
    a = schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch())
    b = schemas.make_batch(schemas.MOTION_WINDOW, _motion_batch(seq=np.arange(3, 6)))
    c = schemas.concat([a, schemas.empty(schemas.MOTION_WINDOW), b], schemas.MOTION_WINDOW)
    assert c.num_rows == 6
    schemas.validate(c, schemas.MOTION_WINDOW)
    assert schemas.empty(schemas.RENDERED_FRAMES, image=(4, 4, 3)).num_rows == 0


def test_errors_survive_pickling():
    """Errors raised inside a stage actor cross Ray by pickle: type, fields and message intact."""
    import pickle

    from echo_stream.errors import InputError, SchemaError

    e = pickle.loads(pickle.dumps(InputError("clip.wav", "zero-length audio\nsecond line")))
    assert type(e) is InputError and (e.what, e.problem) == ("clip.wav", "zero-length audio second line")
    assert str(e) == "clip.wav: zero-length audio second line"
    s = pickle.loads(pickle.dumps(SchemaError("Features", "pts", "not increasing")))
    assert type(s) is SchemaError and str(s) == "Features batch: field 'pts': not increasing"
