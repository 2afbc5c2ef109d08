"""A real S3 server for object-store tests: moto's server in its own process on 127.0.0.1.

The server runs as a separate process, so that `composer -n 2` ranks and DataLoader workers reach it like any S3
endpoint. Clients find it through ``S3_ENDPOINT_URL``, which Streaming's downloader and uploader and Composer's
``S3ObjectStore`` all read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

HOST = '127.0.0.1'
REGION = 'us-east-1'
ACCESS_KEY_ID = 'test-access-key-id'
_START_TIMEOUT_S = 60.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class MotoServer:
    """A running ``python -m moto.server`` process."""

    endpoint: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_moto_server(log_path: Path) -> MotoServer:
    """Start moto's S3 server on a free port of 127.0.0.1 and wait until it responds to HTTP requests."""
    port = free_port()
    endpoint = f'http://{HOST}:{port}'
    # The server needs no credentials, and it gets none of the machine's AWS settings.
    env = {key: value for key, value in os.environ.items() if not key.startswith('AWS_')}
    with open(log_path, 'wb') as log_file:
        process = subprocess.Popen(
            [sys.executable, '-m', 'moto.server', '-H', HOST, '-p', str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = MotoServer(endpoint, process, log_path)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f'moto server on {endpoint} did not start; its output:\n{log_path.read_text()}')
        time.sleep(0.2)
    return server


@dataclass
class S3Bucket:
    """A bucket on the moto server, with the dummy credentials that the test's environment holds."""

    endpoint: str
    name: str
    secret_access_key: str

    def url(self, key: str = '') -> str:
        return f's3://{self.name}/{key}' if key else f's3://{self.name}'

    def client(self):
        import boto3

        return boto3.client(
            's3',
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=self.secret_access_key,
        )

    def keys(self, prefix: str = '') -> list[str]:
        """Return the keys under ``prefix``, sorted."""
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item['Key'] for page in pages for item in page.get('Contents', []))

    def upload_folder(self, folder: Path, prefix: str) -> None:
        """Upload every file under ``folder`` to ``prefix/<relative path>``."""
        client = self.client()
        for path in sorted(folder.rglob('*')):
            if path.is_file():
                client.upload_file(str(path), self.name, f'{prefix}/{path.relative_to(folder).as_posix()}')


def s3_environment(endpoint: str, secret_access_key: str, tmp_path: Path) -> dict[str, str]:
    """Return the environment variables that point boto3 at the moto server with dummy credentials.

    The AWS config and credentials files are empty files in ``tmp_path``, so no file of the machine is read, and the
    instance metadata service is switched off, so a client without credentials sends no request to another address.
    """
    config_file = tmp_path / 'aws-config'
    credentials_file = tmp_path / 'aws-credentials'
    config_file.touch()
    credentials_file.touch()
    return {
        'AWS_ACCESS_KEY_ID': ACCESS_KEY_ID,
        'AWS_SECRET_ACCESS_KEY': secret_access_key,
        'AWS_DEFAULT_REGION': REGION,
        'AWS_CONFIG_FILE': str(config_file),
        'AWS_SHARED_CREDENTIALS_FILE': str(credentials_file),
        'AWS_EC2_METADATA_DISABLED': 'true',
        'S3_ENDPOINT_URL': endpoint,
    }


# Variables that would make boto3 use credentials or endpoints other than the test's.
UNSET_VARIABLES = (
    'AWS_PROFILE',
    'AWS_DEFAULT_PROFILE',
    'AWS_SESSION_TOKEN',
    'AWS_SECURITY_TOKEN',
    'AWS_ENDPOINT_URL',
    'AWS_ENDPOINT_URL_S3',
    'AWS_CONTAINER_CREDENTIALS_RELATIVE_URI',
    'AWS_CONTAINER_CREDENTIALS_FULL_URI',
    'AWS_WEB_IDENTITY_TOKEN_FILE',
    'AWS_ROLE_ARN',
    'MOSAICML_STREAMING_AWS_REQUESTER_PAYS',
)


def new_bucket_name() -> str:
    return f'maect-{uuid.uuid4().hex[:12]}'
