"""Managed replicas on an agent (the container manager's node side): backends that run a model
server and the node manager that keeps an agent's replicas as the control plane assigned them."""
