from sageinfer.transport.base import KVConnector

__all__ = ["KVConnector"]
