"""Graph converters for canonwrap models: ONNX export (with metadata) and parity verification."""
from .onnx_export import ExportResult, export_onnx, read_metadata
from .verify import VerifyReport, verify_onnx

__all__ = ["ExportResult", "export_onnx", "read_metadata", "VerifyReport", "verify_onnx"]
