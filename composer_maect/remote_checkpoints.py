"""Autoresume from checkpoints in an object store (``save_folder: s3://...``).

Composer 0.32.1 saves each checkpoint to the object store and, for the latest one, an object
``{save_latest_filename}.symlink`` whose content is the checkpoint's object name. To autoresume from such a folder,
Composer's Trainer downloads the latest checkpoint to a local path that it derives from the URL itself
(``os.path.abspath('s3://bucket/prefix/latest-rank0.pt')``, a folder named ``s3:`` under the working directory). On
the next start it loads that local copy if it exists and does not look at the object store again. A run that resumed
once therefore resumes from the same, older checkpoint on every later start, and then fails to upload a checkpoint
name that exists already. ``remove_stale_autoresume_copy`` deletes that copy before the Trainer is built, so that
Composer downloads the latest checkpoint from the object store on every start.
"""

from __future__ import annotations

import logging
import os
import urllib.parse

__all__ = ['autoresume_download_path', 'is_remote', 'remove_stale_autoresume_copy']

log = logging.getLogger(__name__)


def is_remote(path: str) -> bool:
    """Return whether ``path`` is an object store URL such as ``s3://bucket/prefix`` (not a local path)."""
    return urllib.parse.urlparse(path).scheme != ''


def autoresume_download_path(save_folder: str, save_latest_filename: str, run_name: str) -> str:
    """Return the local file into which Composer's autoresume downloads the latest checkpoint of a remote folder."""
    from composer.utils import format_name_with_dist

    folder = format_name_with_dist(save_folder, run_name)
    filename = format_name_with_dist(save_latest_filename, run_name)
    # The same expression as Composer's Trainer._get_autoresume_checkpoint; the rank 0 path is used on every rank.
    return os.path.abspath(os.path.join(folder, filename))


def remove_stale_autoresume_copy(save_folder: str, save_latest_filename: str, run_name: str) -> None:
    """Delete the local copy of a remote folder's latest checkpoint that an earlier autoresume downloaded.

    Runs on local rank 0 of every node, where Composer downloads it, and waits for every rank. A local
    ``save_folder`` is left alone.
    """
    from composer.utils import dist

    if not is_remote(save_folder):
        return
    if dist.get_local_rank() == 0:
        # Composer formats the latest filename with rank 0's values and uses that name on every rank.
        stale = autoresume_download_path(save_folder, save_latest_filename.replace('{rank}', '0'), run_name)
        if os.path.lexists(stale):
            os.remove(stale)
            log.info('Removed %s, a checkpoint that an earlier autoresume downloaded from %s', stale, save_folder)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
