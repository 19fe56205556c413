"""Embeddings on disk: Parquet ``utt_index`` (int64) + ``embedding`` (fixed-size list of float32).

The extraction stage may write one file or, through Ray Data's ``write_parquet``,
a directory of many files; :func:`read_embeddings` accepts both and returns one
``(N, D)`` float32 matrix sorted by ``utt_index``, the form the clustering
stage wants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

UTT_INDEX = "utt_index"
EMBEDDING = "embedding"


def write_embeddings(path: str | Path, utt_index: np.ndarray, embeddings: np.ndarray) -> None:
    """Write one Parquet file; the embedding column is ``fixed_size_list<float32>[D]`` so readers need no reshaping."""
    path = Path(path)
    idx = np.asarray(utt_index)
    emb = np.asarray(embeddings)
    if idx.ndim != 1:
        raise ValueError(f"utt_index must be 1-D, got shape {idx.shape} (writing {path})")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"utt_index must be integers, got dtype {idx.dtype} (writing {path})")
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise ValueError(f"embeddings must be 2-D (N, D) with D >= 1, got shape {emb.shape} (writing {path})")
    if emb.shape[0] != idx.shape[0]:
        raise ValueError(
            f"utt_index has {idx.shape[0]} rows but embeddings has {emb.shape[0]} (writing {path})"
        )
    dim = emb.shape[1]
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    table = pa.table({UTT_INDEX: pa.array(idx.astype(np.int64, copy=False), type=pa.int64()), EMBEDDING: column})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def parquet_files(path: str | Path, what: str = "Parquet data") -> list[Path]:
    """The Parquet files of ``path``: the file itself, or a directory's ``*.parquet`` (markers and hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is neither a file nor a directory")
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix == ".parquet" and not p.name.startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"{what} directory {path} contains no .parquet files")
    return files


def _list_to_matrix(chunk: pa.Array, source: Path) -> np.ndarray:
    """View one Arrow chunk of equal-length float lists as an ``(n, D)`` array, without copying when possible.

    Besides ``fixed_size_list`` this accepts ``list``/``large_list`` storage of equal
    length (Ray Data's tensor extension type, read with or without Ray registered).
    """
    if isinstance(chunk, pa.ExtensionArray):
        chunk = chunk.storage
    n = len(chunk)
    if chunk.null_count:
        raise ValueError(f"{source}: column '{EMBEDDING}' has {chunk.null_count} null rows")
    typ = chunk.type
    if pa.types.is_fixed_size_list(typ):
        dim = typ.list_size
        flat = chunk.flatten()
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        if n and (lengths.min() != lengths.max()):
            raise ValueError(
                f"{source}: column '{EMBEDDING}' has rows of different lengths "
                f"({int(lengths.min())}..{int(lengths.max())})"
            )
        dim = int(lengths[0]) if n else 0
        flat = chunk.flatten()
    else:
        raise ValueError(f"{source}: column '{EMBEDDING}' must be a list of floats, got type {typ}")
    if not pa.types.is_floating(flat.type):
        raise ValueError(f"{source}: column '{EMBEDDING}' must hold floats, got {flat.type}")
    if flat.null_count:
        raise ValueError(f"{source}: column '{EMBEDDING}' has {flat.null_count} null values inside vectors")
    if n and dim < 1:
        raise ValueError(f"{source}: column '{EMBEDDING}' holds empty vectors")
    values = flat.to_numpy(zero_copy_only=pa.types.is_float32(flat.type))
    return values.astype(np.float32, copy=False).reshape(n, dim)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a file or directory of embeddings as ``(utt_index int64 ascending, embeddings float32 (N, D))``.

    With a single Arrow chunk already in order the matrix is a read-only view of
    Arrow's buffer; otherwise it is assembled with one copy. A duplicated
    ``utt_index`` is an error: it would give one utterance two votes.
    """
    path = Path(path)
    files = parquet_files(path, "embeddings")
    index_chunks: list[np.ndarray] = []
    matrix_chunks: list[np.ndarray] = []
    for file in files:
        try:
            table = pq.read_table(file, columns=[UTT_INDEX, EMBEDDING])
        except (pa.ArrowInvalid, KeyError) as err:
            raise ValueError(f"cannot read embeddings file {file}: {err}") from err
        idx_col = table.column(UTT_INDEX)
        if not pa.types.is_integer(idx_col.type):
            raise ValueError(f"{file}: column '{UTT_INDEX}' must be integer, got {idx_col.type}")
        if idx_col.null_count:
            raise ValueError(f"{file}: column '{UTT_INDEX}' has {idx_col.null_count} nulls")
        for chunk_idx, chunk_emb in zip(idx_col.chunks, _aligned_chunks(table, file)):
            if len(chunk_idx) == 0:
                continue
            index_chunks.append(chunk_idx.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
            matrix_chunks.append(_list_to_matrix(chunk_emb, file))
    total = sum(len(i) for i in index_chunks)
    if total == 0:
        raise ValueError(f"embeddings {path} contain no rows")
    dims = {m.shape[1] for m in matrix_chunks}
    if len(dims) > 1:
        raise ValueError(f"embeddings in {path} have different dimensions: {sorted(dims)}")
    dim = dims.pop()

    if len(index_chunks) == 1:
        utt_index, matrix = index_chunks[0], matrix_chunks[0]
    else:
        utt_index = np.concatenate(index_chunks)
        matrix = np.empty((total, dim), dtype=np.float32)
        row = 0
        for m in matrix_chunks:
            matrix[row : row + len(m)] = m
            row += len(m)

    if len(utt_index) > 1 and np.any(utt_index[1:] < utt_index[:-1]):
        order = np.argsort(utt_index, kind="stable")
        utt_index = utt_index[order]
        matrix = matrix[order]
    if len(utt_index) > 1:
        dup = utt_index[1:] == utt_index[:-1]
        if dup.any():
            values = np.unique(utt_index[1:][dup])
            raise ValueError(
                f"embeddings {path} repeat {len(values)} utt_index values, e.g. {values[:5].tolist()}"
            )
    return utt_index, matrix


def _aligned_chunks(table: pa.Table, source: Path) -> list[pa.Array]:
    """The embedding column chunked exactly like ``utt_index`` (Parquet readers may chunk columns differently)."""
    idx_col = table.column(UTT_INDEX)
    emb_col = table.column(EMBEDDING)
    if [len(c) for c in idx_col.chunks] == [len(c) for c in emb_col.chunks]:
        return list(emb_col.chunks)
    out = []
    start = 0
    for c in idx_col.chunks:
        out.append(emb_col.slice(start, len(c)).combine_chunks())
        start += len(c)
    return out
