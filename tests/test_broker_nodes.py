"""Several broker nodes in one setting: checked and redacted URL by URL, and a connection to whichever
node answers (against the real broker, with a dead node beside it)."""

from __future__ import annotations

import pytest

from atlas_common import BrokerConnection, check_amqp_url, redact_url, split_urls, url_secrets
from ingestor import IngestorSettings

NODES = "amqp://u:s1@127.0.0.1:1/, amqps://u:s2@node-b:5671/vh?token=t3,amqp://u:s4@node-c/"


def test_a_node_list_is_checked_and_redacted_url_by_url() -> None:
    """Each node keeps its own credentials and port; every secret is masked; a bad node is named."""
    assert split_urls(NODES) == [
        "amqp://u:s1@127.0.0.1:1/",
        "amqps://u:s2@node-b:5671/vh?token=t3",
        "amqp://u:s4@node-c/",
    ]
    assert split_urls("amqp://g:g@h/") == ["amqp://g:g@h/"]
    assert check_amqp_url(NODES) == NODES
    shown = redact_url(NODES)
    for secret in ("s1", "s2", "t3", "s4"):
        assert secret not in shown
    assert shown.count("***") == 4
    assert {"s1", "s2", "t3", "s4"} <= url_secrets(NODES)
    with pytest.raises(ValueError, match="port"):
        check_amqp_url("amqp://a/,amqp://b:99999/")


def test_amqp_urls_is_read_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMQP_URLS names the nodes when AMQP_URL is not set."""
    monkeypatch.delenv("AMQP_URL", raising=False)
    monkeypatch.setenv("AMQP_URLS", "amqp://g:g@a/,amqp://g:g@b/")
    assert split_urls(IngestorSettings().amqp_url) == ["amqp://g:g@a/", "amqp://g:g@b/"]


@pytest.mark.integration
async def test_connects_to_the_node_that_answers(amqp_url: str) -> None:
    """With a dead node listed before and after the live one, every connection lands on the live one."""
    dead = "amqp://guest:guest@127.0.0.1:1/"
    for nodes in (f"{dead},{amqp_url}", f"{amqp_url},{dead}") * 3:  # the start node is random
        async with BrokerConnection(nodes, connect_timeout_s=5) as broker:
            channel = await broker.channel()
            assert not channel.is_closed
    with pytest.raises(OSError, match=r"(?i)connect|refused"):
        async with BrokerConnection(f"{dead},amqp://guest:guest@127.0.0.1:2/", connect_timeout_s=5):
            pass
