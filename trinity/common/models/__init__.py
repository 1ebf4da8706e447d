"""The original's ``trinity.common.models`` package (see ``trinity.common.models.model``)."""
