# The API and the worker, one image. `docker compose up` runs both against real servers.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY limiter ./limiter
COPY metering ./metering
COPY streams ./streams
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 metering
COPY --from=build /install /usr/local
USER metering
WORKDIR /home/metering
ENV METERING_DATA_DIR=/home/metering/var PYTHONUNBUFFERED=1
EXPOSE 8000 9101
ENTRYPOINT ["metering"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
