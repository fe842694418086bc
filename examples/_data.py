"""Where the examples look for their data files, and what they say when the files are not there."""

import sys
from pathlib import Path


def data_files(data_dir: str, folder: str, *names: str) -> Path:
    """``data_dir/folder`` once every one of ``names`` is in it; otherwise exit (code 2) saying where the
    files were looked for and how to point there."""
    root = Path(data_dir) / folder
    missing = [str(root / name) for name in names if not (root / name).exists()]
    if missing:
        print(
            f"{Path(sys.argv[0]).name}: not found: {', '.join(missing)}. The data directory is --data-dir DIR, "
            f"else $METALR_DATA_DIR, else ./data (here {Path(data_dir).resolve()}); pass --data-dir or set "
            f"METALR_DATA_DIR to a folder holding {folder}/ with the original files (in a metalr checkout: "
            "../shared/data).",
            file=sys.stderr,
        )
        sys.exit(2)
    return root
