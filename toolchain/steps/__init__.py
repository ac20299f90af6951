"""Build stages of the host toolchain (data, train, prune, quantize, convert, verify, package).

Conversion is split NNCF-style: ``convert`` holds the neutral part and a registry of back ends
(``convert_tflite``, ``convert_onnx``) loaded on first use, so importing this package stays cheap.
``toolchain.build`` runs the build as steps over the typed records of ``context`` (``BuildOptions``,
``BuildContext``, ``TargetResult``): ``inputs``, then ``reference``, then ``target`` per target.
"""
