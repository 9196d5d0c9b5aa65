"""Images a user names for prediction: files, folders and glob patterns made into one list of paths, and a
dataset that reads them one at a time (so a loader holds a few batches, never the whole list).

A named file is taken whatever its extension (the content says what it is); a folder is walked for image files
(:func:`~spach.data.folder.walk_images`); a pattern the shell did not expand (``'imgs/**/*.png'``, quoted)
is expanded here, ``**`` reaching into sub-folders. An image that cannot be read is not an error of the
dataset: its item carries the one-line reason instead, and the caller decides.
"""
import glob
import os
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import DataError
from ..files import path_kind, regular_file_problem
from .folder import IMG_EXTENSIONS, is_image_name, walk_images

__all__ = ["image_paths", "load_image", "ImageFiles", "collate_images"]


def _matches(pattern: str) -> List[str]:
    names = sorted(glob.glob(pattern, recursive=True))
    if not names:
        raise DataError(f"no file matches {pattern}: check the pattern (quoted, ** matches any depth of folders)")
    return names


def _named(path: str, skipped: List[str]) -> List[str]:
    """The images of one path the user named: itself, or the images a folder holds."""
    kind = path_kind(path)
    if kind == "folder":
        found, left_out = walk_images(path)
        skipped.extend(left_out)
        return found
    if kind != "regular file":
        raise DataError(f"image {path} {regular_file_problem(path)}: pass image files, folders or quoted patterns")
    return [path]


def _matched(path: str, skipped: List[str]) -> List[str]:
    """The images of one path a pattern matched: as a named path, but only image files (as in a folder)."""
    if os.path.isdir(path):
        return _named(path, skipped)
    if not is_image_name(os.path.basename(path)):
        return []
    problem = regular_file_problem(path)
    if problem:
        skipped.append(f"{path} {problem}: skipped (never opened)")
        return []
    return [path]


def image_paths(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(paths, skipped)``: the image files ``inputs`` name, in the order given (each folder in name order,
    each path once), and lines saying what was left out. A missing path, a named special file or a pattern
    matching nothing is a :class:`DataError`; so is an empty result."""
    paths, seen, skipped = [], set(), []
    for item in inputs:
        literal = os.path.lexists(item) or not glob.has_magic(item)  # a file really named 'a[1].png' is a file
        found = _named(item, skipped) if literal else [p for m in _matches(item) for p in _matched(m, skipped)]
        for path in found:
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    if not paths:
        raise DataError(f"no images in {', '.join(inputs)}: pass image files ({', '.join(IMG_EXTENSIONS[:3])} ...), "
                        f"folders holding them, or quoted patterns")
    return paths, skipped


def load_image(path: str, transform) -> torch.Tensor:
    """Read ``path`` as RGB (as training and eval read images) and transform it; any failure is a
    :class:`DataError` naming the file. Only regular files are opened: a FIFO named x.jpg would block forever."""
    from PIL import Image, UnidentifiedImageError
    from ..files import NotARegularFile
    from .folder import load_rgb
    try:
        img = load_rgb(path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except NotARegularFile as e:
        raise DataError(f"image {e}: pass image files") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image format Pillow knows") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely ({str(e).split(',')[0]}; Pillow refuses such "
                        f"files as possible decompression bombs): downscale it first") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt files, permissions
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    return transform(img)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``i`` is ``(i, tensor, '')``, or ``(i, None, why)`` when ``paths[i]`` cannot be read."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], str]:
        try:
            return index, load_image(self.paths[index], self.transform), ""
        except DataError as e:
            return index, None, str(e)


def collate_images(items) -> Tuple[List[int], Optional[torch.Tensor], List[Tuple[int, str]]]:
    """A batch of :class:`ImageFiles` items: ``(indices read, their stacked tensors or None, [(index, why)]
    of those that could not be read)``."""
    read = [(i, x) for i, x, _ in items if x is not None]
    batch = torch.stack([x for _, x in read]) if read else None
    return [i for i, _ in read], batch, [(i, why) for i, x, why in items if x is None]
