"""Batching writer into ``readings``: binary COPY, staged merge on redelivery, rollups, retention."""
