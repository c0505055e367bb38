"""The S3 client every part uses (media, archive, exports), built from the settings.

Path-style addressing: the local stack's endpoint is an IP address, where virtual-host bucket
names cannot resolve; AWS and every S3-compatible server accept path style too. boto3 is
synchronous: callers run its calls in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

from typing import Any

from eventstore.errors import ConfigError
from eventstore.settings import Settings

EXPORTS_BUCKET = "backbone-exports"
ARCHIVE_BUCKET = "backbone-archive"
MEDIA_BUCKET = "backbone-media"


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint (``BACKBONE_S3_*``)."""
    if not settings.s3_endpoint:
        raise ConfigError("BACKBONE_S3_ENDPOINT is not set")
    import boto3  # imported here: boto3 takes a while to import and few processes need it
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key or None,
        aws_secret_access_key=settings.s3_secret_key or None,
        region_name=settings.s3_region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=16,
        ),
    )
