"""Schemas of the com.microsoft operators qspec emits, so that onnxscript can build them.

ONNX Runtime implements these contrib operators, but the onnx package ships no schema for them;
the exporter's translation functions need one to type-check the call, and the checker one to
check the model. Types and attribute defaults are ONNX Runtime 1.32's (`onnxruntime.capi.
onnxruntime_pybind11_state.get_all_operator_schema()`). Registered once.
"""

from functools import cache

from onnx import defs, helper
from onnx.defs import OpSchema

DOMAIN = "com.microsoft"
SLOT_DOMAIN = "qspec.slot"  # where a compressed layer goes until spliced (never in an artifact)
_IN = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_INT = OpSchema.AttrType.INT
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_FLOAT8 = [f"tensor(float8{kind})" for kind in ("e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz")]
_FLOAT4 = "tensor(float4e2m1)"


def _attribute(name: str, default: int | None = None) -> OpSchema.Attribute:
    """An int attribute: required without a default, else optional with ONNX Runtime's default."""
    if default is None:
        return OpSchema.Attribute(name, _INT, "")
    return OpSchema.Attribute(name, helper.make_attribute(name, default), "")


def _optional(name: str, type_name: str) -> OpSchema.FormalParameter:
    return _IN(name, type_name, param_option=_OPTIONAL)


SCHEMAS = (
    OpSchema(
        "MatMulNBits",
        DOMAIN,
        1,
        inputs=[
            _IN("A", "T1"),
            _IN("B", "T2"),
            _IN("scales", "T1"),
            _optional("zero_points", "T3"),
            _optional("g_idx", "T4"),
            _optional("bias", "T1"),
        ],
        outputs=[_IN("Y", "T1")],
        type_constraints=[
            ("T1", _FLOATS, ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", *_FLOATS], ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[
            _attribute("K"),
            _attribute("N"),
            _attribute("bits", 4),
            _attribute("block_size"),
            _attribute("accuracy_level", 0),
            _attribute("weight_prepacked", 0),
        ],
    ),
    OpSchema(
        "GatherBlockQuantized",
        DOMAIN,
        1,
        inputs=[
            _IN("data", "T1"),
            _IN("indices", "Tind"),
            _IN("scales", "T2"),
            _optional("zero_points", "T1"),
        ],
        outputs=[_IN("output", "T2")],
        type_constraints=[
            ("T1", ["tensor(int4)", "tensor(uint4)", "tensor(uint8)", *_FLOAT8, _FLOAT4], ""),
            ("T2", _FLOATS, ""),
            ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
        ],
        attributes=[
            _attribute("bits", 4),
            _attribute("block_size", 128),
            _attribute("gather_axis", 0),
            _attribute("quantize_axis", 1),
        ],
    ),
    OpSchema(
        "DynamicQuantizeMatMul",
        DOMAIN,
        1,
        inputs=[
            _IN("A", "T1"),
            _IN("B", "T2"),
            _IN("b_scale", "T1"),
            _optional("b_zero_point", "T2"),
            _optional("bias", "T1"),
        ],
        outputs=[_IN("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)"], ""),
            ("T2", ["tensor(int8)", "tensor(uint8)"], ""),
        ],
    ),
    OpSchema(
        "Layer",
        SLOT_DOMAIN,
        1,
        inputs=[_IN("X", "T1")],
        outputs=[_IN("Y", "T2")],
        attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "")],
        type_constraints=[
            ("T1", [*_FLOATS, "tensor(int64)", "tensor(int32)"], ""),
            ("T2", _FLOATS, ""),
        ],
    ),
)


@cache
def register() -> None:
    for schema in SCHEMAS:
        try:
            defs.get_schema(schema.name, schema.since_version, schema.domain)
        except defs.SchemaError:
            defs.register_schema(schema)
