"""ClientApp: local training of the node's partition (`partition-id` in its node config) under the server's plan."""

from fedkernels.flower.client import make_client_app

app = make_client_app()
