"""Detection and segmentation operators (owned by the detection work)."""
