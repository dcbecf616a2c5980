"""The flash bundle, format v1: writer, reader and validation.

A bundle is a directory:

    config.json            the model's Hugging Face config, plus "quantization" (mlx-lm's key, for the
                           resident weights) and a "flash" section (below)
    tokenizer.json, tokenizer_config.json, ...   the tokenizer, loadable by mlx-lm / transformers
    resident.safetensors   everything that stays in DRAM: embeddings, attention, norms, LM head,
                           the down projection's group scales (quantized bundles), FFN biases and predictors
    ffn.bin                the FFN: one block per layer of fixed-size neuron records

FFN records. Neuron i of layer l is one contiguous record, ``[gate_i | up_i | down_i]`` for a gated FFN
(SwiGLU) or ``[up_i | down_i]`` for a plain one (biases, one number per neuron, stay resident). ``gate_i`` and ``up_i`` are row i of
the gate and up projections (length d = hidden size); ``down_i`` is column i of the down projection,
the d weights that neuron i's activation is multiplied into. Records are in neuron order; each layer's
block starts on a 16 KiB boundary (the SSD page) so direct I/O can read any run of records. A record
may end in padding (``record.bytes`` beyond its fields): the converter fits records to 4 KiB pages where
that costs little (`page_stride`), so a direct read of one record moves one page, not two.

Float bundles store each part in ``flash.dtype``. Quantized bundles use MLX's affine quantization:
``gate.weight``/``up.weight`` are the packed uint32 codes of the row with its ``scales`` and ``biases``
(groups along d) inside the record, so a cache row feeds ``mx.quantized_matmul`` directly.
The down projection of every quantized source we read (GGUF, mlx-lm, ``--bits``) is grouped along the
neuron axis; a neuron's column therefore holds its codes only (``down.weight``, packed along d, no
second rounding), while the group scales and biases, shared by ``group_size`` neurons and small
(1/8 of the codes at 4 bits), stay resident as ``model.layers.L.mlp.down_scales`` / ``down_biases``.
Or, with ``quantization.down.layout = "rows"``, the converter re-quantizes each neuron's down column along
d (groups of ``group_size`` outputs, at 8 bits or more, so the second rounding is below the first) and
the record holds ``down.weight``, ``down.scales`` and ``down.biases``: nothing of the FFN stays
resident, any subset of neurons in any order is one ``mx.quantized_matmul(h, w, transpose=False)``, and
neurons move one by one (reordering on disk). The sparse product of the grouped layout instead gathers
each selected neuron's group scales at every token: on the 1.5B model 44 ms a layer against 0.8.

The ``flash`` section of config.json::

    format_version   1
    dtype            float dtype of float weights and of quantization scales
    gated, activation, hidden_size, intermediate_size
    activation_threshold  optional: fatrelu's threshold (arch/activations.py)
    quantization     null, or {"gate"|"up"|"down": {"bits", "group_size"}}
    record           {"bytes": R, "fields": [{"name", "dtype", "count", "offset"}, ...]}
    alignment        16384
    layers           [{"offset", "neurons", "sha256"}, ...]   one block per layer in ffn.bin
    files            {"ffn.bin": {"bytes"}, "resident.safetensors": {"bytes", "sha256"}}
    selector         how flash mode picks neurons (`SelectorRecord`: written by train_predictors, or
                     tools/make_synthetic.py, with the predictors), or null
    quality          optional: the measured operating points the planner picks from (`QualityTable`:
                     written by train_predictors' calibration through `update_quality`)

Loading checks the version, the presence and size of every file and (unless told not to) every
checksum, and refuses a bundle that fails with a message naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..arch.activations import is_sparse
from ..errors import BundleError, ConvertError
from .checksums import CONFIG_DIGEST, config_digest, sha256_file, with_digest
from .quality_record import QualityTable
from .selector_record import SelectorRecord

FORMAT_VERSION = 1
ALIGNMENT = 16 * 1024
PAGE = 4096  # what a direct read moves at least: records are padded to fit pages where that costs little
MAX_PAGE_PADDING = 0.15  # padding a record to whole pages (or a page's halves, quarters, ...) costs at most this
CONFIG_FILE = "config.json"
RESIDENT_FILE = "resident.safetensors"
EMBEDDING_PREFIX = "model.embed_tokens."
SAFETENSORS_NUMPY = {"U8": np.uint8, "U32": np.uint32, "F16": np.float16, "BF16": np.uint16, "F32": np.float32}
FFN_FILE = "ffn.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_ITEMSIZE = {"uint8": 1, "uint16": 2, "uint32": 4, "float16": 2, "bfloat16": 2, "float32": 4}


def mx_dtype(name: str) -> mx.Dtype:
    return getattr(mx, name)


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def to_numpy_bytes(a: mx.array) -> np.ndarray:
    """The raw bits of an MLX array as numpy (bfloat16 travels as uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    count: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.count * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class RecordLayout:
    """The fixed byte layout of one neuron record."""

    fields: tuple[Field, ...]
    nbytes: int

    @classmethod
    def build(cls, parts: Iterable[tuple[str, str, int]], page_fit: bool = False) -> RecordLayout:
        """Fields in order, each on its item size; the record on 16 bytes, or with `page_fit` on the
        stride `page_stride` chooses."""
        fields, offset = [], 0
        for name, dtype, count in parts:
            offset = round_up(offset, _ITEMSIZE[dtype])
            fields.append(Field(name, dtype, count, offset))
            offset += count * _ITEMSIZE[dtype]
        size = round_up(offset, 16)
        return cls(tuple(fields), page_stride(size) if page_fit else size)

    def parts(self) -> list[tuple[str, str, int]]:
        """(name, dtype, count) of each field: what `build` takes."""
        return [(f.name, f.dtype, f.count) for f in self.fields]

    @property
    def field_bytes(self) -> int:
        """The bytes of the fields alone: what a cached record takes in DRAM (padding stays on disk)."""
        return sum(f.nbytes for f in self.fields)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def pack(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Per-field arrays of shape (n, count) -> records (n, nbytes) uint8."""
        n = next(iter(parts.values())).shape[0]
        out = np.zeros((n, self.nbytes), dtype=np.uint8)
        for f in self.fields:
            a = np.ascontiguousarray(parts[f.name])
            if a.shape != (n, f.count) or a.dtype.itemsize != _ITEMSIZE[f.dtype]:
                raise ConvertError(
                    f"record field {f.name}: expected ({n}, {f.count}) of {f.dtype}, found {a.shape} of {a.dtype}"
                )
            out[:, f.offset : f.offset + f.nbytes] = a.view(np.uint8).reshape(n, f.nbytes)
        return out

    def view(self, records: mx.array, name: str) -> mx.array:
        """One field of records (n, nbytes) uint8 as an (n, count) array of its dtype."""
        f = self[name]
        return records[:, f.offset : f.offset + f.nbytes].view(mx_dtype(f.dtype))

    def to_json(self) -> dict:
        return {"bytes": self.nbytes, "fields": [f.__dict__ for f in self.fields]}

    @classmethod
    def from_json(cls, d: dict) -> RecordLayout:
        return cls(tuple(Field(**f) for f in d["fields"]), d["bytes"])


@dataclass
class LayerBlock:
    offset: int
    neurons: int
    sha256: str = ""


@dataclass
class FFNSpec:
    """The `flash` section of config.json: what ffn.bin holds and how."""

    hidden_size: int
    intermediate_size: int
    gated: bool
    activation: str
    dtype: str
    quantization: dict | None
    record: RecordLayout
    layers: list[LayerBlock] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    selector: SelectorRecord | None = None
    quality: QualityTable | None = None  # the measured operating points (format/quality_record.py)
    activation_threshold: float = 0.0  # fatrelu's t (arch/activations.py)
    alignment: int = ALIGNMENT
    format_version: int = FORMAT_VERSION

    @property
    def smooth_gated(self) -> bool:
        """A gated FFN whose activation is never exactly zero (SwiGLU, GeGLU): the gate and activation
        selectors apply; a ReLU-family one has a non-zero set its predictor learns instead."""
        return self.gated and not is_sparse(self.activation)

    def block_bytes(self, layer: int) -> int:
        return self.layers[layer].neurons * self.record.nbytes

    @property
    def ffn_bytes(self) -> int:
        """ffn.bin's records on disk (page padding included): what naive mode reads."""
        return sum(self.block_bytes(i) for i in range(len(self.layers)))

    @property
    def ffn_weight_bytes(self) -> int:
        """The FFN's weights: the records' fields, without page padding (what DRAM holds of them)."""
        return sum(b.neurons for b in self.layers) * self.record.field_bytes

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "dtype": self.dtype,
            "gated": self.gated,
            "activation": self.activation,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "quantization": self.quantization,
            "record": self.record.to_json(),
            "alignment": self.alignment,
            "layers": [b.__dict__ for b in self.layers],
            "files": self.files,
            "selector": self.selector.to_json() if self.selector else None,
            **({"quality": self.quality.to_json()} if self.quality else {}),
            **({"activation_threshold": self.activation_threshold} if self.activation_threshold else {}),
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> FFNSpec:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: unsupported flash format_version {version!r} "
                f"(this mlxflash reads version {FORMAT_VERSION}); reconvert the model"
            )
        try:
            layers = [LayerBlock(**b) for b in d["layers"]]
            selector = SelectorRecord.from_json(d["selector"], where, len(layers)) if d.get("selector") else None
            quality = QualityTable.from_json(d["quality"], where) if d.get("quality") else None
            return cls(
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                gated=d["gated"],
                activation=d["activation"],
                dtype=d["dtype"],
                quantization=d["quantization"],
                record=RecordLayout.from_json(d["record"]),
                layers=layers,
                files=d["files"],
                selector=selector,
                quality=quality,
                activation_threshold=float(d.get("activation_threshold", 0.0)),
                alignment=d["alignment"],
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed flash section ({e!r} missing or wrong)") from e


def page_stride(nbytes: int) -> int:
    """A record's size on disk. A record straddling a page boundary makes a direct read of it move one
    page more: 3,648-byte records (the 1.5B model's) move 7.7 KB each on average, padded to 4,096 one
    page. So a record is padded to a whole number of pages, or to a page's half, quarter, ... (never
    straddling), where that adds at most MAX_PAGE_PADDING; else it stays as it is."""
    if nbytes >= PAGE:
        stride = round_up(nbytes, PAGE)
    else:
        stride = PAGE
        while stride // 2 >= nbytes:
            stride //= 2
    return stride if stride <= nbytes * (1 + MAX_PAGE_PADDING) else nbytes


def down_rows(quantization: dict | None) -> bool:
    """Whether a quantized bundle's down columns are quantized per neuron, along d (layout "rows")."""
    return bool(quantization) and quantization["down"].get("layout") == "rows"


def record_parts(hidden_size: int, gated: bool, dtype: str, quantization: dict | None) -> list[tuple[str, str, int]]:
    """The fields of a neuron record for this FFN shape and storage."""
    names = (["gate"] if gated else []) + ["up"]
    parts: list[tuple[str, str, int]] = []
    for name in names:
        if quantization:
            q = quantization[name]
            parts += [
                (f"{name}.weight", "uint32", hidden_size * q["bits"] // 32),
                (f"{name}.scales", dtype, hidden_size // q["group_size"]),
                (f"{name}.biases", dtype, hidden_size // q["group_size"]),
            ]
        else:
            parts.append((f"{name}.weight", dtype, hidden_size))
    if quantization:
        q = quantization["down"]
        parts.append(("down.weight", "uint32", hidden_size * q["bits"] // 32))
        if down_rows(quantization):
            parts += [
                ("down.scales", dtype, hidden_size // q["group_size"]),
                ("down.biases", dtype, hidden_size // q["group_size"]),
            ]
    else:
        parts.append(("down.weight", dtype, hidden_size))
    return parts


class Bundle:
    """A validated flash bundle on disk (read-only)."""

    def __init__(self, path: Path, config: dict, spec: FFNSpec):
        self.path = path
        self.config = config
        self.spec = spec

    @property
    def ffn_path(self) -> Path:
        return self.path / FFN_FILE

    @property
    def num_layers(self) -> int:
        return len(self.spec.layers)

    def resident_weights(self) -> dict[str, mx.array]:
        return mx.load(str(self.path / RESIDENT_FILE))

    @property
    def resident_bytes(self) -> int:
        return self.spec.files[RESIDENT_FILE]["bytes"]

    @functools.cached_property
    def resident_header(self) -> tuple[int, dict]:
        """(where the tensor data starts, the safetensors header) of resident.safetensors."""
        try:  # read before any checksum is verified (planning): a damaged header is refused here too
            with open(self.path / RESIDENT_FILE, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for v in header.values():
                v["nbytes"] = v["data_offsets"][1] - v["data_offsets"][0]
            return 8 + size, header
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError, MemoryError) as e:
            raise BundleError(f"{self.path / RESIDENT_FILE}: unreadable safetensors header ({type(e).__name__})") from e

    def _tensor_bytes(self, names) -> int:
        header = self.resident_header[1]
        return sum(header[k]["nbytes"] for k in names)

    @functools.cached_property
    def predictor_bytes(self) -> int:
        """Bytes of the neuron predictors inside resident.safetensors (not part of the model's weights)."""
        return self._tensor_bytes(k for k in self.resident_header[1] if ".mlp.predictor." in k)

    @functools.cached_property
    def streamed_embedding(self) -> tuple[str, ...]:
        """The input embedding's tensors where the LM head has its own (untied): flash mode leaves them on
        the SSD and reads each token's row (runtime/embedding.py); () where the head is the embedding."""
        header = self.resident_header[1]
        if not any(k.startswith("lm_head.") for k in header):
            return ()
        return tuple(k for k in header if k.startswith(EMBEDDING_PREFIX))

    @property
    def streamed_embedding_bytes(self) -> int:
        return self._tensor_bytes(self.streamed_embedding)

    def resident_rows(self, names) -> dict[str, np.ndarray]:
        """Read-only memory maps of resident tensors (row lookups touch only the pages of their rows);
        bfloat16 comes as uint16 (numpy has no bfloat16)."""
        start, header = self.resident_header
        out = {}
        for name in names:
            entry = header[name]
            dtype = SAFETENSORS_NUMPY.get(entry["dtype"])
            if dtype is None:
                raise BundleError(f"{self.path / RESIDENT_FILE}: {name} has dtype {entry['dtype']}, not one to map")
            rows = np.memmap(
                self.path / RESIDENT_FILE, dtype, "r", start + entry["data_offsets"][0], tuple(entry["shape"])
            )
            if rows.nbytes != entry["nbytes"]:
                raise BundleError(
                    f"{self.path / RESIDENT_FILE}: {name} holds {entry['nbytes']} bytes, its shape needs {rows.nbytes}"
                )
            out[name] = rows
        return out

    @property
    def weights_bytes(self) -> int:
        """The model's own weights: resident.safetensors without the predictors, plus the FFN's fields."""
        return self.resident_bytes - self.predictor_bytes + self.spec.ffn_weight_bytes

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        if not config_path.is_file():
            raise BundleError(f"{config_path}: missing (not a flash bundle; convert with `mlxflash convert`)")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{config_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict) or "flash" not in config:
            raise BundleError(f"{config_path}: no 'flash' section (not a flash bundle)")
        # checked even unverified (it is cheap): a flipped bit in the key's name must not skip the check
        if CONFIG_DIGEST not in config:
            raise BundleError(f"{config_path}: no {CONFIG_DIGEST} (altered or corrupt; reconvert the model)")
        if config_digest(config) != config[CONFIG_DIGEST]:
            raise BundleError(f"{config_path}: checksum mismatch (the config was altered or is corrupt)")
        try:
            spec = cls._parse_spec(config["flash"], str(config_path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field of the wrong shape
            raise BundleError(f"{config_path}: malformed 'flash' section ({type(e).__name__}: {e})") from e
        bundle = cls(path, config, spec)
        bundle._check_files(verify)
        return bundle

    @classmethod
    def _parse_spec(cls, flash: dict, where: str) -> FFNSpec:
        if flash.get("kind") == "moe":  # format/moe.py's MoEBundle opens these
            raise BundleError(f"{where}: a mixture-of-experts bundle; open it with mlxflash.load (MoEBundle)")
        return FFNSpec.from_json(flash, where)

    def _check_files(self, verify: bool) -> None:
        for name, meta in self.spec.files.items():
            p = self.path / name
            if not p.is_file():
                raise BundleError(f"{p}: missing from the bundle")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise BundleError(f"{p}: truncated or altered: {size} bytes, expected {meta['bytes']}")
        if FFN_FILE not in self.spec.files or RESIDENT_FILE not in self.spec.files:
            raise BundleError(f"{self.path / CONFIG_FILE}: flash.files must list {FFN_FILE} and {RESIDENT_FILE}")
        if not verify:
            return
        for name, meta in self.spec.files.items():  # resident.safetensors and the tokenizer's files
            if "sha256" in meta and sha256_file(self.path / name) != meta["sha256"]:
                raise BundleError(f"{self.path / name}: checksum mismatch (corrupt bundle)")
        for i, block in enumerate(self.spec.layers):
            if sha256_file(self.ffn_path, block.offset, self.spec.block_bytes(i)) != block.sha256:
                raise BundleError(f"{self.ffn_path}: checksum mismatch in layer {i}'s block (corrupt bundle)")


class BundleWriter:
    """Writes a bundle into a temporary sibling directory and renames it into place on `finish`.

    Use as a context manager: on any error the temporary directory is removed, so a crash never
    leaves a directory that looks like a bundle.
    """

    def __init__(self, out: str | os.PathLike, spec: FFNSpec):
        self.out = Path(out)
        if self.out.exists():
            raise ConvertError(f"{self.out}: already exists; choose another output path or remove it first")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
        except OSError as e:
            raise ConvertError(f"{parent}: cannot write the bundle here ({e.strerror})") from e
        self.spec = spec
        self._ffn = open(self.tmp / FFN_FILE, "wb")

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        if not self._ffn.closed:
            self._ffn.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add_layer(self, parts: dict[str, np.ndarray]) -> None:
        """Append one layer's FFN: per-field arrays (neurons, count), in record field order."""
        records = self.spec.record.pack(parts)
        offset = self._ffn.tell()
        data = records.tobytes()
        self._ffn.write(data)
        self._ffn.write(b"\0" * (round_up(len(data), ALIGNMENT) - len(data)))
        self.spec.layers.append(LayerBlock(offset, records.shape[0], hashlib.sha256(data).hexdigest()))

    def finish(self, config: dict, resident: dict[str, mx.array], tokenizer_dir: Path | None) -> Path:
        self._ffn.close()
        mx.save_safetensors(str(self.tmp / RESIDENT_FILE), resident, metadata={"format": "mlx"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy(tokenizer_dir / name, self.tmp / name)
        self.spec.files = {
            FFN_FILE: {"bytes": (self.tmp / FFN_FILE).stat().st_size},
            RESIDENT_FILE: {
                "bytes": (self.tmp / RESIDENT_FILE).stat().st_size,
                "sha256": sha256_file(self.tmp / RESIDENT_FILE),
            },
            **{
                name: {"bytes": (self.tmp / name).stat().st_size, "sha256": sha256_file(self.tmp / name)}
                for name in TOKENIZER_FILES
                if (self.tmp / name).is_file()
            },
        }
        config = with_digest({**config, "flash": self.spec.to_json()})
        (self.tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if self.out.exists():
            raise ConvertError(f"{self.out}: appeared while converting; not overwriting it")
        os.rename(self.tmp, self.out)
        return self.out


def update_resident(bundle: Bundle, extra: dict[str, mx.array], selector: SelectorRecord) -> None:
    """Add tensors (predictors) to resident.safetensors and record `selector`, atomically; the quality
    table is dropped (it measured the selectors being replaced).

    Writes the new resident file and config beside the old ones and renames them into place;
    the config (which carries the resident checksum) is renamed last.
    """
    weights = {**bundle.resident_weights(), **extra}
    tmp_res = bundle.path / f".tmp-{RESIDENT_FILE}"  # keeps the suffix: mx.save_safetensors adds one otherwise
    tmp_cfg = bundle.path / f".{CONFIG_FILE}.tmp"
    try:
        mx.save_safetensors(str(tmp_res), weights, metadata={"format": "mlx"})
        spec = bundle.spec
        spec.selector, spec.quality = selector, None
        spec.files[RESIDENT_FILE] = {"bytes": tmp_res.stat().st_size, "sha256": sha256_file(tmp_res)}
        _write_config(bundle, tmp_cfg)
        os.replace(tmp_res, bundle.path / RESIDENT_FILE)
        os.replace(tmp_cfg, bundle.path / CONFIG_FILE)
    finally:
        tmp_res.unlink(missing_ok=True)
        tmp_cfg.unlink(missing_ok=True)


def update_quality(bundle: Bundle, table: QualityTable) -> None:
    """Record the measured quality table in config.json, atomically (written beside it, then renamed)."""
    tmp_cfg = bundle.path / f".{CONFIG_FILE}.tmp"
    try:
        bundle.spec.quality = table
        _write_config(bundle, tmp_cfg)
        os.replace(tmp_cfg, bundle.path / CONFIG_FILE)
    finally:
        tmp_cfg.unlink(missing_ok=True)


def _write_config(bundle: Bundle, path: Path) -> None:
    """The bundle's config with its current flash section and a fresh digest, written to `path`."""
    path.write_text(json.dumps(with_digest({**bundle.config, "flash": bundle.spec.to_json()}), indent=2) + "\n")
