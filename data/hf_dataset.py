"""Any Hugging Face semantic segmentation dataset as training and evaluation data.

    spec = hf_dataset_spec(args)          # --dataset_name, --image_column, ... (add_hf_dataset_args), or None
    splits = load_splits(spec)            # {"train": source, "validation": source, ...} (data.cityscapes sources)
    id2label = read_id2label(spec)        # --id2label FILE, else the id2label.json beside the dataset / in its repo
    space = label_space(spec, len(id2label))

--dataset_name takes what the Hugging Face example run_semantic_segmentation_no_trainer.py takes, a hub id, and
also a `save_to_disk` folder or parquet files (one file, a glob, or a folder whose file names name the splits:
train.parquet, validation.parquet). Columns: "image" and "label" by default, as in the example (which also takes
"pixel_values" / "annotation" when those are missing). Without a "validation" split, --train_val_split (0.15) of
train is split off, seeded, as the example does. The label images hold class ids (0..N-1, 255 = ignored), or with
--reduce_labels 0 = background (ignored) and 1..N.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import huggingface_hub

from data.cityscapes import from_hf_dataset, read_pair
from data.labels import IGNORE_INDEX, LabelSpace

ID2LABEL_FILE = "id2label.json"  # the file the Hugging Face example reads from a dataset's hub repository
TRAIN_VAL_SPLIT = 0.15  # the example's default
VALIDATION = "validation"
DEFAULT_COLUMNS = {"image": "pixel_values", "label": "annotation"}  # the example's names, and its fallbacks


@dataclass(frozen=True)
class HFDatasetSpec:
    """What --dataset_name and its options name; saved in a trained model's config (training_data)."""

    dataset_name: str
    image_column: str | None = None  # None: "image", else the example's "pixel_values"
    label_column: str | None = None  # None: "label", else "annotation"
    id2label: str | None = None  # a JSON file; None: the dataset's own id2label.json
    reduce_labels: bool = False
    train_val_split: float = TRAIN_VAL_SPLIT
    seed: int = 0  # of the train/validation split, when the dataset has no validation split

    def record(self) -> dict:
        return {"dataset": "hf", **asdict(self)}


def add_hf_dataset_args(parser, id2label: bool = True) -> None:
    """The options of a Hugging Face dataset (scripts/train.py, scripts/eval.py, which takes the classes from the
    model: id2label=False). Every default is None, so that eval.py can tell the ones given from those to take from
    the checkpoint's training run."""
    parser.add_argument("--dataset_name", default=None, metavar="NAME_OR_PATH",
                        help="a Hugging Face dataset instead of --data_root: a hub id, a save_to_disk folder or "
                             "parquet files (a file, a glob, or a folder of train/validation files)")
    parser.add_argument("--image_column", default=None, help="default: image (or pixel_values)")
    parser.add_argument("--label_column", default=None, help="default: label (or annotation)")
    if id2label:
        parser.add_argument("--id2label", default=None, metavar="JSON",
                            help='class names, {"0": "road", ...}; default: the id2label.json beside the dataset or in '
                                 "its hub repository. Their number sizes the classifier")
    parser.add_argument("--reduce_labels", action="store_true", default=None,
                        help="labels hold 0 = background (ignored) and classes 1..N (e.g. ADE20k)")
    parser.add_argument("--train_val_split", type=float, default=None,
                        help=f"without a validation split: the fraction of train held out, seeded (default "
                             f"{TRAIN_VAL_SPLIT})")


def hf_dataset_spec(args, saved: dict | None = None) -> HFDatasetSpec | None:
    """The dataset the options name, None without --dataset_name. Options not given are taken from `saved` (a
    checkpoint's training_data) when it names the same dataset, then the defaults; a local path is made absolute,
    so that the record finds it from any working directory."""
    saved = saved if isinstance(saved, dict) and saved.get("dataset") == "hf" else {}
    name = args.dataset_name or saved.get("dataset_name")
    if name is None:
        return None
    if args.dataset_name and Path(args.dataset_name).exists():
        name = str(Path(args.dataset_name).resolve())
    if name != saved.get("dataset_name"):
        saved = {}
    given = {key: getattr(args, key, None) for key in HFDatasetSpec.__dataclass_fields__ if key != "dataset_name"}
    values = {key: value if value is not None else saved.get(key) for key, value in given.items()}
    return HFDatasetSpec(name, **{key: value for key, value in values.items() if value is not None})


def label_space(spec: HFDatasetSpec, num_labels: int) -> LabelSpace:
    return LabelSpace(num_labels, bool(spec.reduce_labels))


# --------------------------------------------------------------------------------------------------- loading
def load_dataset_dict(name: str) -> datasets.DatasetDict:
    """A save_to_disk folder (load_from_disk), parquet files, or anything `datasets.load_dataset` takes (a hub id,
    a local folder of data files); a single dataset becomes the train split."""
    path = Path(name)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(name)
        elif name.endswith(".parquet"):
            loaded = datasets.load_dataset("parquet", data_files=name)
        else:
            loaded = datasets.load_dataset(name)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        message = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{name}: cannot load it ({type(error).__name__}: {message}); expected a datasets hub id, a "
                         "save_to_disk folder or parquet files") from error
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _column(ds: datasets.Dataset, given: str | None, default: str, split: str) -> str:
    fallback = DEFAULT_COLUMNS[default]
    column = given or (fallback if default not in ds.column_names and fallback in ds.column_names else default)
    if column not in ds.column_names:
        raise ValueError(f"--{default}_column {column}: the {split} split has no such column (columns: "
                         f"{', '.join(ds.column_names)})")
    return column


def with_validation(splits: datasets.DatasetDict, spec: HFDatasetSpec) -> datasets.DatasetDict:
    """The splits with a "validation" one: the dataset's own, else a seeded part of train (the HF example's way)."""
    if "train" not in splits:
        raise ValueError(f"{spec.dataset_name}: no train split (splits: {', '.join(splits)})")
    if VALIDATION in splits:
        return splits
    if not 0 < spec.train_val_split < 1:
        raise ValueError(f"--train_val_split: the dataset has no {VALIDATION} split; expected a fraction in (0, 1) "
                         f"of train to hold out, got {spec.train_val_split}")
    parts = splits["train"].train_test_split(test_size=spec.train_val_split, seed=spec.seed)
    return datasets.DatasetDict({**splits, "train": parts["train"], VALIDATION: parts["test"]})


def load_splits(spec: HFDatasetSpec) -> dict[str, datasets.Dataset]:
    """Every split of the dataset (with "validation") as a source: columns image, label (undecoded), city, stem."""
    splits = with_validation(load_dataset_dict(spec.dataset_name), spec)
    sources = {}
    for split, ds in splits.items():
        columns = (_column(ds, spec.image_column, "image", split), _column(ds, spec.label_column, "label", split))
        if len(ds) == 0:
            raise ValueError(f"{spec.dataset_name}: the {split} split is empty; expected (image, label) rows")
        sources[split] = from_hf_dataset(ds, *columns)
    return sources


def image_size(source: datasets.Dataset, space: LabelSpace) -> tuple[int, int]:
    """(h, w) of the first sample, decoded and checked."""
    return read_pair(source[0]["image"], source[0]["label"], "row 0", space)[1].shape


# ---------------------------------------------------------------------------------------------------- classes
def read_id2label(spec: HFDatasetSpec) -> dict[int, str]:
    """The class names: --id2label, else the dataset's id2label.json (beside a local dataset, or in its hub repo)."""
    path = spec.id2label or _dataset_id2label_file(spec.dataset_name)
    if path is None:
        raise ValueError(f"{spec.dataset_name}: no {ID2LABEL_FILE} beside the dataset or in its hub repository; "
                         'expected --id2label FILE.json naming the classes ({"0": "road", "1": "car", ...})')
    return parse_id2label(path)


def _dataset_id2label_file(name: str) -> str | None:
    path = Path(name)
    if path.exists() or "*" in name:  # local files: the JSON in the dataset's folder
        folder = path if path.is_dir() else path.parent
        return str(folder / ID2LABEL_FILE) if (folder / ID2LABEL_FILE).is_file() else None
    try:
        return huggingface_hub.hf_hub_download(name, ID2LABEL_FILE, repo_type="dataset")
    except (huggingface_hub.errors.HfHubHTTPError, OSError, ValueError):  # no such file, repo or network
        return None


def parse_id2label(path) -> dict[int, str]:
    """{id: name} from a JSON object {"0": name, ...} (or a list of names); ids must be 0..N-1, N <= 255."""
    try:
        loaded = json.loads(Path(path).read_text())
        id2label = dict(enumerate(loaded)) if isinstance(loaded, list) else {int(k): str(v) for k, v in loaded.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"--id2label {path}: unreadable ({error}); expected a JSON object "
                         '{"0": "road", "1": "car", ...}') from error
    if sorted(id2label) != list(range(len(id2label))) or not 1 <= len(id2label) <= IGNORE_INDEX:
        raise ValueError(f"--id2label {path}: ids {sorted(id2label)[:8]}...; expected the class ids 0..N-1 "
                         f"(1 <= N <= {IGNORE_INDEX}; {IGNORE_INDEX} is the ignore index), each once")
    return dict(sorted(id2label.items()))
