"""Schemas of the com.microsoft operators qspec emits, so that onnxscript can build them.

ONNX Runtime implements these contrib operators, but the onnx package ships no schema for them;
the exporter's translation functions need one to type-check the call. Registered once.
"""

from functools import cache

from onnx import defs
from onnx.defs import OpSchema

DOMAIN = "com.microsoft"
_IN = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_INT = OpSchema.AttrType.INT


def _attribute(name: str, required: bool = True) -> OpSchema.Attribute:
    if required:
        return OpSchema.Attribute(name, _INT, "")
    return OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=False)


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
            ("T1", ["tensor(float)", "tensor(float16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[
            _attribute("K"),
            _attribute("N"),
            _attribute("bits"),
            _attribute("block_size"),
            _attribute("accuracy_level", required=False),
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
            ("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], ""),
            ("T2", ["tensor(float)", "tensor(float16)"], ""),
            ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
        ],
        attributes=[
            _attribute("bits", required=False),
            _attribute("block_size", required=False),
            _attribute("gather_axis", required=False),
            _attribute("quantize_axis", required=False),
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
)


@cache
def register() -> None:
    for schema in SCHEMAS:
        try:
            defs.get_schema(schema.name, schema.since_version, schema.domain)
        except defs.SchemaError:
            defs.register_schema(schema)
