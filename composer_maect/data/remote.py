"""Check object stores before any work starts: a remote data set's index and shards, and an output bucket.

Streaming downloads shards lazily, so a misspelled bucket, missing credentials or a deleted shard would otherwise
surface only after the model is built, or in the middle of an epoch. ``check_remote_split`` reads the index with short
timeouts and few retries and lists the split's folder once (one request per 1,000 objects, not one per shard).
``check_output_bucket`` checks that the bucket of a checkpoint folder or conversion output exists. Every error is a
``RemoteDataError`` that names the URL and what to check. Its message leaves out passwords written into URLs and the
values of ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN``.

Checked schemes: ``s3://`` (also S3-compatible stores through ``S3_ENDPOINT_URL``) and plain local paths. Other
schemes that Streaming reads (``gs://``, ``oci://``, ...) are not checked here.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from composer_maect.data.shards import join_truncated

__all__ = [
    'RemoteDataError',
    'RemoteSplit',
    'check_output_bucket',
    'check_remote_split',
    'check_remotes_on_every_node',
]

log = logging.getLogger(__name__)

INDEX_FILENAME = 'index.json'

# Bounds of the check: each request gives up after these timeouts, and is attempted at most this often (botocore's
# standard retry mode, with exponential backoff between attempts).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3

_MAX_LISTED_NAMES = 10
_URL_USERINFO = re.compile(r'//[^/@\s"\']+@')
_SECRET_VARIABLES = ('AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN')
_ACCESS_DENIED_CODES = {'403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AllAccessDisabled'}
_NOT_FOUND_CODES = {'404', 'NoSuchKey', 'NotFound'}


class RemoteDataError(RuntimeError):
    """The remote data set cannot be read, or is incomplete. The message names the URL and what to check."""


class _S3RequestError(RemoteDataError):
    """An error response of the object store, with its error ``code`` such as ``NoSuchKey``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RemoteSplit:
    """The result of a check: the split's URL, and the number of shards and samples that its ``index.json`` lists."""

    url: str
    num_shards: int
    num_samples: int


def _split_url(remote: str, split: str | None) -> str:
    return f'{remote.rstrip("/")}/{split}' if split else remote.rstrip('/')


def _shard_names(index: dict[str, Any], index_url: str) -> list[tuple[str, ...]]:
    """Return, per shard, the file names under which it may be stored (raw, or compressed when it has zip data)."""
    shards = index.get('shards')
    if not isinstance(shards, list):
        raise RemoteDataError(
            f'{index_url} is not a Streaming index: it has no list of shards. Point train_loader.remote at a folder '
            'that `python -m composer_maect.data.convert` wrote.'
        )
    names = []
    for shard in shards:
        options = [shard.get(key, {}).get('basename') for key in ('raw_data', 'zip_data') if shard.get(key)]
        names.append(tuple(name for name in options if name))
    return names


def _check_shards(index: dict[str, Any], index_url: str, folder_url: str, existing: set[str]) -> RemoteSplit:
    shard_names = _shard_names(index, index_url)
    missing = [names[0] for names in shard_names if not names or not any(name in existing for name in names)]
    if missing:
        listed_names = join_truncated(missing, ', ', _MAX_LISTED_NAMES)
        raise RemoteDataError(
            f'{index_url} lists {len(shard_names)} shards, but {len(missing)} of them are missing in {folder_url}: '
            f'{listed_names}. Upload the missing shard files again, or convert the data set again into an empty '
            'folder.'
        )
    num_samples = sum(int(shard.get('samples', 0)) for shard in index['shards'])
    return RemoteSplit(url=folder_url, num_shards=len(shard_names), num_samples=num_samples)


def _parse_index(data: bytes, index_url: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RemoteDataError(f'{index_url} is not valid JSON ({error}). Convert the data set again.') from error
    if not isinstance(index, dict):
        raise RemoteDataError(f'{index_url} is not a Streaming index (not a JSON object). Convert the data set again.')
    return index


# ---------------------------------------------------------------------------------------------------------------------
# Local paths
# ---------------------------------------------------------------------------------------------------------------------


def _check_local(folder: str) -> RemoteSplit:
    index_path = os.path.join(folder, INDEX_FILENAME)
    if not os.path.isfile(index_path):
        raise RemoteDataError(
            f'No {INDEX_FILENAME} in {folder!r}. Check train_loader.remote and train_loader.split, or convert a data '
            'set there with `python -m composer_maect.data.convert`.'
        )
    with open(index_path, 'rb') as file:
        index = _parse_index(file.read(), index_path)
    existing = set(os.listdir(folder))
    return _check_shards(index, index_path, folder, existing)


# ---------------------------------------------------------------------------------------------------------------------
# S3 and S3-compatible stores
# ---------------------------------------------------------------------------------------------------------------------


def _endpoint_description() -> str:
    endpoint = os.environ.get('S3_ENDPOINT_URL')
    if not endpoint:
        return 'AWS S3 (S3_ENDPOINT_URL is not set)'
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.username or parsed.password:
        # Credentials written into the URL are left out of every message.
        parsed = parsed._replace(netloc=parsed.hostname + (f':{parsed.port}' if parsed.port else ''))
    return f'endpoint {urllib.parse.urlunsplit(parsed)} (from S3_ENDPOINT_URL)'


def _redact(text: str) -> str:
    """Remove user names and passwords written into URLs, and the values of the secret AWS variables, from ``text``."""
    text = _URL_USERINFO.sub('//', text)
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, '***')
    return text


_CREDENTIALS_HINT = (
    'Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), or '
    'AWS_PROFILE with a profile in ~/.aws/credentials, as for any boto3 client.'
)


class _S3Reader:
    """A boto3 S3 client with short timeouts and few retries, and the errors of its requests translated."""

    def __init__(self, setting: str = 'train_loader.remote') -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        session = boto3.session.Session()
        try:
            credentials = session.get_credentials()
        except BotoCoreError as error:  # For example PartialCredentialsError: a key id without its secret.
            raise RemoteDataError(f'Invalid AWS credentials: {error}. {_CREDENTIALS_HINT}') from None
        # Without credentials the request goes out unsigned, as Streaming does for public buckets.
        self.anonymous = credentials is None
        self.setting = setting
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={'mode': 'standard', 'total_max_attempts': MAX_ATTEMPTS},
            signature_version=UNSIGNED if self.anonymous else None,
        )
        self.client = session.client('s3', endpoint_url=os.environ.get('S3_ENDPOINT_URL') or None, config=config)

    def request(self, url: str, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return getattr(self.client, operation)(**kwargs)
        except (EndpointConnectionError, BotoConnectionError, HTTPClientError) as error:
            raise RemoteDataError(
                f'Request for {url} failed: {_endpoint_description()} did not respond after {MAX_ATTEMPTS} attempts '
                f'({type(error).__name__}: {_redact(str(error))}). Check S3_ENDPOINT_URL (unset it for AWS S3), that '
                'the server is running, and the network.'
            ) from None
        except (NoCredentialsError, PartialCredentialsError) as error:
            reason = _redact(str(error))
            raise RemoteDataError(f'Invalid credentials for {url}: {reason}. {_CREDENTIALS_HINT}') from None
        except ClientError as error:
            raise self._client_error(url, error, kwargs.get('Bucket', '')) from None
        except BotoCoreError as error:
            raise RemoteDataError(
                f'Failed to read {url} from {_endpoint_description()}: {type(error).__name__}: {_redact(str(error))}.'
            ) from None

    def _client_error(self, url: str, error: Any, bucket: str) -> _S3RequestError:
        code = str(error.response.get('Error', {}).get('Code', ''))
        if code == 'NoSuchBucket':
            return _S3RequestError(
                f'Bucket {bucket!r} of {url} does not exist at {_endpoint_description()}. Check the bucket name in '
                f'{self.setting}.',
                code,
            )
        if code in _ACCESS_DENIED_CODES:
            if self.anonymous:
                return _S3RequestError(
                    f'Access denied to {url}: no AWS credentials were found, and the bucket does not allow anonymous '
                    f'reads. {_CREDENTIALS_HINT}',
                    code,
                )
            return _S3RequestError(
                f'Access denied to {url} ({code}) at {_endpoint_description()}. Check that the credentials are valid '
                'for this store and allow s3:GetObject and s3:ListBucket on the bucket.',
                code,
            )
        reason = _redact(str(error))
        return _S3RequestError(f'Failed to read {url} from {_endpoint_description()}: {code}: {reason}.', code)


def _list_folder(reader: _S3Reader, bucket: str, prefix: str, folder_url: str) -> set[str]:
    """Return the names of the objects directly under ``prefix`` (a key prefix that ends with '/')."""
    names: set[str] = set()
    token = None
    while True:
        kwargs = {'Bucket': bucket, 'Prefix': prefix, 'Delimiter': '/'}
        if token:
            kwargs['ContinuationToken'] = token
        page = reader.request(folder_url, 'list_objects_v2', **kwargs)
        names.update(item['Key'][len(prefix) :] for item in page.get('Contents', []))
        if not page.get('IsTruncated'):
            return names
        token = page['NextContinuationToken']


def _subfolders(reader: _S3Reader, bucket: str, prefix: str, url: str) -> list[str]:
    try:
        page = reader.request(url, 'list_objects_v2', Bucket=bucket, Prefix=prefix, Delimiter='/', MaxKeys=100)
    except RemoteDataError:
        return []
    return [item['Prefix'][len(prefix) :].rstrip('/') for item in page.get('CommonPrefixes', [])]


def _folder_hint(reader: _S3Reader, bucket: str, folder_key: str) -> str:
    """Name the sub-folders of the folder, or else of its nearest ancestor that has any, to show a misspelling."""
    children = _subfolders(reader, bucket, f'{folder_key}/' if folder_key else '', bucket)
    if children:
        return f' The folder has the sub-folders {children}: set train_loader.split to one of them.'
    ancestor = folder_key
    while ancestor:
        ancestor = posixpath.dirname(ancestor)
        prefix = f'{ancestor}/' if ancestor else ''
        folders = _subfolders(reader, bucket, prefix, bucket)
        if folders:
            return f' s3://{bucket}/{prefix} has the folders {folders}.'
    return ''


def _check_s3(folder_url: str) -> RemoteSplit:
    parsed = urllib.parse.urlparse(folder_url)
    bucket, folder_key = parsed.netloc, parsed.path.strip('/')
    prefix = f'{folder_key}/' if folder_key else ''
    index_url = f'{folder_url}/{INDEX_FILENAME}'
    reader = _S3Reader()
    if reader.anonymous:
        log.info('No AWS credentials found: reading %s anonymously, as from a public bucket', folder_url)

    try:
        response = reader.request(index_url, 'get_object', Bucket=bucket, Key=prefix + INDEX_FILENAME)
    except _S3RequestError as error:
        if error.code not in _NOT_FOUND_CODES:
            raise
        hint = _folder_hint(reader, bucket, folder_key)
        raise RemoteDataError(
            f'{index_url} not found at {_endpoint_description()}.{hint} Check the prefix in train_loader.remote and '
            'train_loader.split, or convert a data set there with `python -m composer_maect.data.convert SOURCE '
            's3://BUCKET/PREFIX`.'
        ) from None
    index = _parse_index(response['Body'].read(), index_url)
    existing = _list_folder(reader, bucket, prefix, folder_url)
    return _check_shards(index, index_url, folder_url, existing)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def check_remote_split(remote: str, split: str | None = None) -> RemoteSplit | None:
    """Check that ``remote/split`` has a readable ``index.json`` and every shard file that it lists.

    Each request times out after ``CONNECT_TIMEOUT_S`` (connecting) and ``READ_TIMEOUT_S`` (reading) and is attempted
    at most ``MAX_ATTEMPTS`` times.

    Args:
        remote: the data set's location as Streaming's ``remote``: ``s3://bucket/prefix`` or a local path.
        split: the sub-folder with the split, or None.

    Returns:
        The number of shards and samples found, or None for a scheme that is not checked (this is logged).

    Raises:
        RemoteDataError: the store cannot be reached, the bucket or ``index.json`` does not exist, the credentials are
            missing or rejected, or a shard listed in the index is missing.
    """
    folder_url = _split_url(remote, split)
    scheme = urllib.parse.urlparse(remote).scheme
    if scheme == '':
        return _check_local(folder_url)
    if scheme == 's3':
        result = _check_s3(folder_url)
        log.info('Checked %s: %d shards with %d samples', folder_url, result.num_shards, result.num_samples)
        return result
    log.info('Not checking %s before training: only s3:// and local remotes are checked', folder_url)
    return None


def check_output_bucket(url: str, setting: str = 'save_folder') -> None:
    """Check that the bucket of an ``s3://`` output folder exists and that credentials for it were found.

    Whether the credentials allow writing is not checked: Composer's Trainer checks it for a ``save_folder`` by
    uploading a small object when it starts. Other schemes and local folders are not checked.

    Args:
        url: the output folder, which may contain format placeholders such as ``{run_name}`` after the bucket.
        setting: the name of the setting or argument that ``url`` came from, for the error message.

    Raises:
        RemoteDataError: the store cannot be reached, the bucket does not exist, or no credentials were found.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != 's3' or '{' in parsed.netloc:
        return
    reader = _S3Reader(setting=setting)
    if reader.anonymous:
        raise RemoteDataError(f'No AWS credentials found to write to {url} ({setting}). {_CREDENTIALS_HINT}')
    # Format placeholders such as {run_name} may follow in the key, so only the part before the first one is listed.
    prefix = parsed.path.lstrip('/').split('{', 1)[0]
    reader.request(url, 'list_objects_v2', Bucket=parsed.netloc, Prefix=prefix, MaxKeys=1)
    log.info('Checked the bucket of %s', url)


def check_remotes_on_every_node(remote: str | None, split: str | None, save_folder: str | None = None) -> None:
    """Run ``check_remote_split`` and ``check_output_bucket`` on local rank 0 of every node and raise on every rank.

    Every rank raises the same ``RemoteDataError``, so no rank waits for a failed one at a collective.

    NOTE: the remote is checked even when the local cache already contains every shard, so a run whose remote cannot
    be reached stops here, although Streaming could train from a complete cache.
    """
    from composer.utils import dist

    message = None
    if dist.get_local_rank() == 0:
        try:
            if remote is not None:
                check_remote_split(remote, split)
            if save_folder is not None:
                check_output_bucket(save_folder)
        except RemoteDataError as error:
            message = str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = dist.all_gather_object(message)
        message = next((item for item in messages if item is not None), None)
    if message is not None:
        raise RemoteDataError(_redact(message))
