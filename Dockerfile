# FLARE24 submission image: `python -m lightning_flare.predict` on /workspace/inputs -> /workspace/outputs.
#   CPU:  docker build -t flare-cpu --build-arg MODEL=path/in/repo/model.ckpt .
#   CUDA: docker build -t flare-gpu --build-arg MODEL=... --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   run:  docker container run --gpus "device=0" -m 28G --rm -v $PWD/inputs/:/workspace/inputs/ \
#           -v $PWD/outputs/:/workspace/outputs/ flare-gpu /bin/bash -c "sh predict.sh"
# MODEL is a lightning_flare checkpoint inside the build context (train one, or convert an nnU-Net folder with
# python -m lightning_flare.convert_nnunet). Nothing is downloaded at run time.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG MODEL=model.ckpt
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 WANDB_MODE=offline

WORKDIR /workspace
COPY pyproject.toml constraints.txt README.md ./
COPY lightning_flare ./lightning_flare
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==2.13.0" \
    && pip install -c constraints.txt .
COPY configs ./configs
COPY docker/predict.sh ./predict.sh
COPY ${MODEL} /workspace/model.ckpt
# the CPU's bf16-or-fp32 choice is measured on first use; keep its cache inside the container
ENV LIGHTNING_FLARE_CACHE=/tmp/lightning_flare
CMD ["sh", "predict.sh"]
