"""The images ``anycnn predict`` is given: files, and folders of them.

A folder stands for the image files directly inside it: those whose name ends in one of
:data:`anycnn.data.imagefolder.IMAGE_EXTENSIONS` (any case), hidden files (``.name``) left out,
sorted by name. Subfolders are not searched (a folder of class subfolders, as ``anycnn train``
reads, is given as ``photos/val/*/``); a folder with no image file directly inside is reported
as a bad entry naming its subfolders. A file named on the command line is taken whatever its
extension (reading it says whether it is an image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One image to predict, or one argument that gave none.

    Attributes:
        path: the image file, as given or as found in a given folder (the folder for an
            ``error`` about the folder).
        error: None, or why there is nothing to read there (without the path).
    """

    path: str
    error: str | None = None


def image_entries(arguments: list[str]) -> list[Entry]:
    """The images of the command line's ``IMAGE`` arguments, in order: a file as itself, a
    folder as its image files (module docstring), or an :class:`Entry` with an ``error`` for
    a folder holding none."""
    entries: list[Entry] = []
    for argument in arguments:
        if not os.path.isdir(argument):
            entries.append(Entry(argument))
            continue
        files, folders = folder_images(Path(argument))
        if files:
            entries += [Entry(str(Path(argument) / name)) for name in files]
            continue
        from ..data.imagefolder import IMAGE_EXTENSIONS

        why = f"folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        if folders:
            shown = ", ".join(f"{name}/" for name in folders[:3])
            more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
            why += (f"; its subfolders ({shown}{more}) are not searched: give them, e.g. "
                    f"{os.path.join(argument, '*', '')}")
        entries.append(Entry(argument, why))
    return entries


def folder_images(folder: Path) -> tuple[list[str], list[str]]:
    """``(image file names, subfolder names)`` directly inside ``folder``, each sorted; hidden
    entries are left out.

    Raises:
        PermissionError, OSError: the folder cannot be listed.
    """
    from ..data.imagefolder import IMAGE_EXTENSIONS

    files, folders = [], []
    with os.scandir(folder) as listing:
        for item in listing:
            if item.name.startswith("."):
                continue
            if item.is_dir():
                folders.append(item.name)
            elif item.is_file() and item.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(item.name)
    return sorted(files), sorted(folders)
