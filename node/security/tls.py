"""Mutual TLS for the Stage service: every server requires a client certificate from the swarm CA, and every
client checks that the server's certificate names the node its DHT record says it is."""

from __future__ import annotations

import grpc

from node.security.keys import NodeCredentials

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


def server_credentials(creds: NodeCredentials) -> grpc.ServerCredentials:
    """Server side: this node's certificate, and client certificates required and checked against the CA."""
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )


def channel_credentials(creds: NodeCredentials) -> grpc.ChannelCredentials:
    """Client side: trust only the swarm CA, and present this node's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )


def target_name_options(node: str) -> list[tuple[str, str]]:
    """Dial an address but verify the server as ``node`` (certificates name nodes, not addresses)."""
    return [(TARGET_NAME_OPTION, node)]
