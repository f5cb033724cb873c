"""ddpm.data.storage: the one storage-options builder and the one place the S3 endpoint is read."""

from __future__ import annotations

import pytest

from ddpm.data.storage import S3_ENDPOINT_VARS, s3_endpoint, storage_options_for


@pytest.fixture
def no_endpoint(monkeypatch):
    for name in S3_ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("url", ["/data/x", "file:///data/x", "relative/x", "gs://b/x", "memory://x"])
def test_non_s3_urls_get_no_options(no_endpoint, url):
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert storage_options_for(url) == {}


def test_s3_without_an_endpoint_talks_to_aws(no_endpoint):
    assert s3_endpoint() is None
    assert storage_options_for("s3://bucket/x") == {}


def test_endpoint_is_read_when_called_s3_variable_first_argument_wins(no_endpoint):
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    assert storage_options_for("s3://bucket/x") == {"endpoint_url": "http://general:9000"}
    assert storage_options_for("s3a://bucket/x") == {"endpoint_url": "http://general:9000"}
    no_endpoint.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage_options_for("s3://bucket/x") == {"endpoint_url": "http://s3-only:9000"}
    assert storage_options_for("s3://bucket/x", "http://given:1") == {"endpoint_url": "http://given:1"}
    no_endpoint.setenv("AWS_ENDPOINT_URL_S3", "")  # an empty variable counts as unset
    assert s3_endpoint() == "http://general:9000"


def test_options_never_hold_keys(no_endpoint):
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    no_endpoint.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    no_endpoint.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")
    assert "planted" not in repr(storage_options_for("s3://bucket/x"))
