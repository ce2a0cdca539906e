"""Data: load a dataset (local folder/file or Hugging Face hub id) and partition it across clients with
flwr-datasets partitioners (:mod:`fedlora.batching` turns examples into model inputs).

Every dataset becomes a pair of ``datasets.Dataset`` (train, test) with either
- ``text`` and ``label`` columns (classification), or
- ``prompt`` and ``response`` columns (instruction data for causal LMs).
A seeded validation split is carved from the training rows (:func:`split`): the server evaluates on it every
round (tuning, early stop, "best"); clients are partitioned from the remaining rows only and never see it.
Problems with the data are :class:`DataError` (one sentence, exit 2 in the CLI).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

from .config import REPO_ROOT, ConfigError, first_line

SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
#: SST-2 beside a source checkout (``<checkout>/../shared/data/sst2``), found from where the fedlora package is
#: installed (an editable install: the checkout), never from the working directory or Flower's app copy; an
#: installed wheel has no such place. The environment variable ``FEDLORA_SST2`` (a folder) takes precedence.
SHARED_SST2 = REPO_ROOT.parent / "shared" / "data" / "sst2"
SST2_ENV = "FEDLORA_SST2"
SST2_HUB = "stanfordnlp/sst2"


class DataError(ConfigError):
    """A data problem (missing path, malformed file, wrong columns), explained in one sentence."""


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def _read_table(path: Path, fmt: str):
    import pandas as pd

    fmt = SUFFIXES.get(path.suffix.lower(), fmt) if fmt == "auto" else fmt
    try:
        if fmt in ("tsv", "csv"):
            df = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",",
                             quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                             keep_default_na=False, on_bad_lines="error", dtype=str)
        elif fmt == "json":
            with open(path) as fh:
                obj = json.load(fh)
            if isinstance(obj, dict):  # {"train": [...]} or {"data": [...]}
                obj = next((v for v in obj.values() if isinstance(v, list)), None)
            if not isinstance(obj, list):
                raise ValueError("expected a JSON list of records")
            df = pd.DataFrame.from_records(obj)
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown data format '{fmt}': use tsv, csv, json, jsonl or parquet.")
    except DataError:
        raise
    except Exception as e:  # pandas/json raise many types; the user needs the file and the reason
        reason = first_line(e)
        raise DataError(f"{path} could not be read as {fmt} ({reason}): fix the file or set data.format.") from None
    if len(df) == 0:
        raise DataError(f"{path} has no rows: point data.path at a non-empty file.")
    return df


def _find_split(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            p = folder / f"{name}{suffix}"
            if p.exists():
                return p
    return None


def _classification(df, data_cfg, path):
    tcol, lcol = data_cfg.text_column, data_cfg.label_column
    missing = [c for c in (tcol, lcol) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}): "
            f"set data.text_column/data.label_column."
        )
    import pandas as pd

    labels = pd.to_numeric(df[lcol], errors="coerce")
    if labels.isna().any():
        bad = df[lcol][labels.isna()].iloc[0]
        raise DataError(f"{path}: label {bad!r} in column {lcol!r} is not an integer class id: fix the file.")
    out = pd.DataFrame({"text": df[tcol].astype(str), "label": labels.astype(int)})
    return out


def _instruction(df, path):
    for c in ("instruction", "output"):
        if c not in df.columns:
            raise DataError(f"{path} has no column {c!r}: Alpaca data needs instruction, input (optional) and output.")
    import pandas as pd

    inp = df["input"].fillna("").astype(str) if "input" in df.columns else pd.Series([""] * len(df))
    prompts = [
        f"### Instruction:\n{i}\n\n" + (f"### Input:\n{x}\n\n" if x else "") + "### Response:\n"
        for i, x in zip(df["instruction"].astype(str), inp)
    ]
    return pd.DataFrame({"prompt": prompts, "response": df["output"].astype(str)})


def resolve_path(data_cfg) -> str:
    path = data_cfg.get("path")
    if path in (None, "", "null"):
        if data_cfg.name != "sst2":
            raise DataError(f"data={data_cfg.name} needs data.path=<file or folder>.")
        return default_sst2()
    return str(path)


def default_sst2() -> str:
    """Where ``data=sst2`` without ``data.path`` reads from, on this machine: ``$FEDLORA_SST2``, else the folder beside
    the checkout fedlora is installed from (:data:`SHARED_SST2`), else the hub id ``stanfordnlp/sst2``. A node resolves
    it itself (a server never sends a path), so under ``flwr run`` it is the same for the ServerApp and the nodes."""
    import os

    env = os.environ.get(SST2_ENV, "").strip()
    if env:
        if not Path(env).expanduser().is_dir():
            raise DataError(f"{SST2_ENV}={env} is not a folder: point it at the SST-2 folder (train.tsv, dev.tsv) "
                            f"or unset it.")
        return str(Path(env).expanduser().resolve())
    in_checkout = (REPO_ROOT / "pyproject.toml").is_file()
    return str(SHARED_SST2) if in_checkout and SHARED_SST2.is_dir() else SST2_HUB


@functools.lru_cache(maxsize=4)
def _load_cached(data_yaml: str):
    from omegaconf import OmegaConf

    return _load(OmegaConf.create(data_yaml))


def load(data_cfg):
    """(train, test) as ``datasets.Dataset``; cached per process (clients call it every round)."""
    from omegaconf import OmegaConf

    return _load_cached(OmegaConf.to_yaml(data_cfg, resolve=True))


def _drop_unlabelled(test_df, where, data_cfg):
    """The test split without its unlabelled rows (a negative label such as -1: hub test splits are often
    unlabelled), their count said in a warning; None when no row is labelled (the test split is then carved from
    the training rows, ``data.test_fraction``). Nothing is ever given a label it does not have."""
    import warnings

    unlabelled = test_df["label"] < 0
    if not unlabelled.any():
        return test_df
    if unlabelled.all():
        warnings.warn(f"fedlora: the test split of {where} is unlabelled ({len(test_df)} rows with a negative label): "
                      f"holding out data.test_fraction={data_cfg.get('test_fraction', 0.1)} of the training rows "
                      "as the test split instead.", stacklevel=3)
        return None
    warnings.warn(f"fedlora: dropped {int(unlabelled.sum())} unlabelled rows (negative label) of the {len(test_df)} "
                  f"rows of the test split of {where}; evaluating on the {int((~unlabelled).sum())} labelled ones.",
                  stacklevel=3)
    return test_df[~unlabelled]


def _load(data_cfg):
    import datasets
    import pandas as pd

    src = resolve_path(data_cfg)
    kind = data_cfg.get("kind", "classification")
    p = Path(src).expanduser()
    fmt = data_cfg.get("format", "auto")
    train_df = test_df = None
    if p.exists():
        if p.is_dir():
            tr = _find_split(p, [data_cfg.get("train_split", "train")])
            te = _find_split(p, [data_cfg.get("test_split", "test"), "dev", "test", "validation"])
            if tr is None:
                raise DataError(f"{p} holds no train.tsv/csv/json/jsonl/parquet file: point data.path at the data.")
            train_df = _read_table(tr, fmt)
            test_df = _read_table(te, fmt) if te is not None else None
            where = tr
        else:
            train_df, where = _read_table(p, fmt), p
    elif "/" in src and not src.startswith((".", "/", "~")) and fmt in ("auto", "hub"):
        try:
            ds = datasets.load_dataset(src)
        except Exception as e:
            reason = first_line(e)
            raise DataError(f"data.path={src} is neither a local path nor a loadable hub dataset ({reason}).") from None
        train_df = ds[data_cfg.get("train_split", "train")].to_pandas()
        test_name = next((s for s in ("validation", "test") if s in ds and s != "train"), None)
        test_df = ds[test_name].to_pandas() if test_name else None
        where = src
    else:
        raise DataError(f"data.path={src} does not exist: point it at a file or folder (or a hub id like {SST2_HUB}).")

    if kind == "instruction":
        convert = lambda df, w: _instruction(df, w)  # noqa: E731
    else:
        convert = lambda df, w: _classification(df, data_cfg, w)  # noqa: E731
    train_df = convert(train_df, where)
    if kind != "instruction" and (train_df["label"] < 0).any():
        bad = train_df["label"][train_df["label"] < 0]
        raise DataError(f"{where}: {len(bad)} of the {len(train_df)} training rows have a negative label (e.g. "
                        f"{int(bad.iloc[0])}, unlabelled): every training row needs a class id >= 0, so remove those "
                        "rows or fix the file.")
    if test_df is not None:
        test_df = convert(test_df, where)
        if kind != "instruction":
            test_df = _drop_unlabelled(test_df, where, data_cfg)
    if test_df is None:
        frac = float(data_cfg.get("test_fraction", 0.1))
        test_df = train_df.sample(frac=frac, random_state=0)
        train_df = train_df.drop(test_df.index)
    if data_cfg.get("max_train_examples"):
        train_df = train_df.iloc[: int(data_cfg.max_train_examples)]
    train = datasets.Dataset.from_pandas(train_df.reset_index(drop=True), preserve_index=False)
    test = datasets.Dataset.from_pandas(pd.DataFrame(test_df).reset_index(drop=True), preserve_index=False)
    if kind != "instruction":
        n_labels = int(max(train["label"])) + 1
        if n_labels < 2:
            raise DataError(f"{where} has a single class: classification needs at least two labels.")
    return train, test


# ----------------------------------------------------------------------------------------------
# The validation split: carved from the training rows, seeded, never given to a client
# ----------------------------------------------------------------------------------------------
VALIDATION_FRACTION, VALIDATION_MAX = 0.05, 2000
VALIDATION_SALT = 0x5A11D  # its draw is independent of every other draw seeded by ``seed``


def validation_count(spec, n: int) -> int:
    """Rows of the validation split for ``data.validation_size=spec`` and ``n`` training rows: null gives
    min(5% of n, 2,000); a fraction in (0, 1) gives that share of n (rounded); an integer >= 1 gives that many
    rows; 0 turns it off. Anything else, or a split that leaves no training rows, is a :class:`DataError`."""
    if spec is None or spec == "null":
        return min(int(round(VALIDATION_FRACTION * n)), VALIDATION_MAX)
    ok = isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec >= 0
    if ok and 0 < spec < 1:
        k = int(round(float(spec) * n))
    elif ok and float(spec) == int(spec):
        k = int(spec)
    else:
        raise DataError(f"data.validation_size={spec!r} must be a fraction in (0, 1), a row count, 0 (off) or null "
                        f"(min(5% of the training rows, {VALIDATION_MAX})).")
    if k >= n:
        raise DataError(f"data.validation_size={spec} takes {k} of the {n} training rows and leaves none to train "
                        "on: use a smaller validation_size.")
    return k


def validation_indices(cfg):
    """Indices, into the training split of :func:`load`, of the validation rows (sorted): drawn with ``seed``."""
    from omegaconf import OmegaConf

    return _indices_cached(OmegaConf.to_yaml(cfg.data, resolve=True), int(cfg.seed))[1]


@functools.lru_cache(maxsize=4)
def _indices_cached(data_yaml: str, seed: int):
    """(training indices, validation indices) into the loaded training split, both sorted numpy arrays."""
    import numpy as np
    from omegaconf import OmegaConf

    n = len(_load_cached(data_yaml)[0])
    k = validation_count(OmegaConf.create(data_yaml).get("validation_size"), n)
    val = np.sort(np.random.default_rng([seed, VALIDATION_SALT]).permutation(n)[:k])
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep), val


@functools.lru_cache(maxsize=4)
def _split_cached(data_yaml: str, seed: int):
    """(training rows, validation, test) for :func:`split`, built once per (data config, seed)."""
    train, test = _load_cached(data_yaml)
    rows, val = _indices_cached(data_yaml, seed)
    if len(val) == 0:
        return train, train.select([]), test
    return train.select(rows.tolist()), train.select(val.tolist()), test


def split(cfg):
    """(training rows, validation, test) as ``datasets.Dataset``, cached per process like :func:`load`.

    Validation: ``data.validation_size`` rows drawn with ``seed`` from the training split (:func:`validation_count`;
    default min(5%, 2,000)), for tuning, early stopping and picking the best round. Training rows: the rest, all
    that :func:`partition` deals to clients. Test: the held-out split of :func:`load` (SST-2: the GLUE dev set),
    reported only."""
    from omegaconf import OmegaConf

    return _split_cached(OmegaConf.to_yaml(cfg.data, resolve=True), int(cfg.seed))


def validation(cfg):
    """The validation split of :func:`split`."""
    return split(cfg)[1]


# ----------------------------------------------------------------------------------------------
# Partitioning (flwr-datasets)
# ----------------------------------------------------------------------------------------------
def make_partitioner(part_cfg, num_partitions: int, seed: int, label_column: str = "label"):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    name = part_cfg.name
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=label_column, alpha=float(part_cfg.alpha),
            min_partition_size=int(part_cfg.get("min_partition_size", 10)), self_balancing=False, seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions, partition_by=label_column,
            num_classes_per_partition=int(part_cfg.classes_per_client), seed=seed,
        )
    if name == "label_skew":
        return LabelSkewPartitioner(list(part_cfg.proportions), label_column=label_column, seed=seed)
    raise ConfigError(f"unknown partitioner '{name}': choose iid, dirichlet, pathological or label_skew.")


class LabelSkewPartitioner:
    """Fixed label mixes per client, e.g. [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]] (FFA-LoRA's setting):
    the examples of each class are shuffled (seeded) and dealt so client k gets p_k[c] of its own share.
    Every client gets len(train)/K examples (capped by availability)."""

    def __init__(self, proportions, label_column="label", seed=0):
        self.proportions = [list(map(float, p)) for p in proportions]
        self.label_column, self.seed = label_column, seed
        self.dataset = None
        self._idx = None

    @property
    def num_partitions(self):
        return len(self.proportions)

    def _compute(self):
        import numpy as np

        labels = np.asarray(self.dataset[self.label_column])
        rng = np.random.default_rng(self.seed)
        K = len(self.proportions)
        per_client = len(labels) // K
        pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
        self._idx = []
        for props in self.proportions:
            idx = []
            for c, p in enumerate(props):
                pool = pools.get(c, [])  # a class the data lacks gives nothing (the pre-flight refuses it)
                take = min(int(round(p * per_client)), len(pool))
                idx += [int(i) for i in pool[:take]]
                pools[c] = pool[take:]
            self._idx.append(sorted(idx))

    def load_partition(self, partition_id: int):
        if self._idx is None:
            self._compute()
        return self.dataset.select(self._idx[partition_id])


@functools.lru_cache(maxsize=8)
def _partitions_cached(data_yaml: str, part_yaml: str, num_partitions: int, seed: int):
    from omegaconf import OmegaConf

    train, _, _ = _split_cached(data_yaml, seed)  # the validation rows never reach a client
    # Partitioners read the label column whole: in Arrow's format that is one copy (0.3 s for SST-2's training rows),
    # in Python's datasets 4 builds it row by row (2 s, every partitioner of every process). partition() hands
    # clients their rows back in Python's format.
    train = train.with_format("arrow")
    part_cfg = OmegaConf.create(part_yaml)
    if part_cfg.name == "dirichlet":
        return _draw_dirichlet(part_cfg, train, num_partitions, seed)
    part = make_partitioner(part_cfg, num_partitions, seed)
    part.dataset = train
    return part


def _draw_dirichlet(part_cfg, train, num_partitions: int, seed: int):
    """A Dirichlet partitioner of ``train``, its partitions dealt. flwr-datasets draws at most 11 times for every
    client to get min_partition_size rows, then raises; at a small alpha over few classes (alpha 0.1, 2 labels,
    10 clients: about one draw in eight fits) that fails for some seeds. As NIID-Bench's sampler (Li et al., ICDE 2022), which redraws
    until it fits, fedlora starts it again from a seed derived from (seed, k), k = 1..redraws: deterministic per seed,
    and a seed whose first partitioner fits keeps its partitions."""
    import warnings

    import numpy as np

    redraws = int(part_cfg.get("redraws", 10))
    for k in range(redraws + 1):
        part = make_partitioner(part_cfg, num_partitions,
                                int(np.random.SeedSequence([seed, 0xD1C, k]).generate_state(1)[0]) if k else seed)
        part.dataset = train
        try:
            with warnings.catch_warnings():  # the per-draw "not satisfied" warnings: the redraws handle them
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                part.load_partition(0)
            return part
        except ValueError as e:
            if "max number of attempts" not in str(e):
                raise
    raise ValueError(f"no Dirichlet draw with alpha={part_cfg.alpha} gave every one of the {num_partitions} clients "
                     f"min_partition_size={part_cfg.get('min_partition_size', 10)} rows in {11 * (redraws + 1)} draws: "
                     "raise partitioner.alpha, lower partitioner.min_partition_size or use fewer clients")


def partition(cfg, partition_id: int):
    """Client ``partition_id``'s training examples (same for every strategy given the same seed), dealt from the
    training rows of :func:`split`: the validation split is left out."""
    from omegaconf import OmegaConf

    data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
    _split_cached(data_yaml, int(cfg.seed))
    part_yaml = OmegaConf.to_yaml(cfg.partitioner, resolve=True)
    part = _partitions_cached(data_yaml, part_yaml, int(cfg.num_clients), int(cfg.seed))
    return part.load_partition(partition_id).with_format(None)


def holdout_indices(n: int, fraction: float, seed: int, partition_id: int):
    """(training, held-out) sorted indices into a client's partition of n rows: the held-out slice (FedSA-LoRA personal
    evaluation; never trained on) is round(fraction n) rows in [1, n - 1] (none if fraction is 0 or n < 2), seeded."""
    import numpy as np
    k = min(n - 1, max(1, int(round(float(fraction) * n)))) if fraction > 0 and n >= 2 else 0
    held = np.sort(np.random.default_rng([int(seed), 0x4E1D, int(partition_id)]).permutation(n)[:k])  # own salt
    return np.setdiff1d(np.arange(n), held), held


def check_partitions(cfg) -> list[int]:
    """Load data, the validation split and partitions up front; return partition sizes. Raises DataError with one
    sentence."""
    train, _, _ = split(cfg)
    if len(train) < cfg.num_clients:
        raise ConfigError(f"num_clients={cfg.num_clients} is more than the {len(train)} training examples: "
                          "use fewer clients.")
    try:
        sizes = [len(partition(cfg, i)) for i in range(cfg.num_clients)]
    except ValueError as e:  # flwr-datasets refuses impossible partitionings with a ValueError
        raise ConfigError(f"partitioner {cfg.partitioner.name} cannot split the data into {cfg.num_clients} clients "
                          f"({str(e).splitlines()[0]}).") from None
    empty = [i for i, s in enumerate(sizes) if s == 0]
    if empty:
        raise ConfigError(f"client {empty[0]} gets no examples with partitioner {cfg.partitioner.name}: "
                          "use fewer clients or another partitioner.")
    return sizes
