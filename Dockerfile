# MedFinder Node image. The `train` target carries torch (training, evaluation, export); the default
# runtime target does not (node and workers need no torch).
FROM python:3.11-slim AS runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY model_export ./model_export
COPY trainer ./trainer
COPY workers ./workers
COPY dicom_node ./dicom_node
RUN pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 MEDFINDER__PATHS__WORK_DIR=/data/runs MEDFINDER__PATHS__DATA_DIR=/data/medfinder-data
ENTRYPOINT ["medfinder"]

FROM runtime AS train
RUN pip install --no-cache-dir ".[train]"

# GPU embedding worker: onnxruntime-gpu replaces onnxruntime (never both in one environment).
FROM runtime AS gpu
RUN pip uninstall -y onnxruntime && pip install --no-cache-dir onnxruntime-gpu==1.31.1
