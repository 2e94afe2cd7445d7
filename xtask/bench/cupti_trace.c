/* CUPTI injection library: a timeline of every kernel, memcpy/memset and driver API call of a
 * CUDA program, for finding where the device idles (no nsys on the device machine).
 *   gcc -shared -fPIC -O2 cupti_trace.c -I$CUPTI/include -I$CUDA/include -L$CUPTI/lib64 -lcupti \
 *       -DKERNEL_T=CUpti_ActivityKernelN -DMEMCPY_T=CUpti_ActivityMemcpyN -DMEMSET_T=... -o libtrace.so
 *   CUPTI_TRACE_OUT=trace.csv CUDA_INJECTION64_PATH=$PWD/libtrace.so program ...
 * Lines: K,start,end,stream,correlation,name | A,start,end,thread,correlation,api |
 *        M,start,end,stream,correlation,bytes | S,start,end,stream,correlation,bytes */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 8 << 20;
  *buffer = (uint8_t *)aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
  CUpti_Activity *record = NULL;
  pthread_mutex_lock(&lock);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      KERNEL_T *k = (KERNEL_T *)record;
      fprintf(out, "K,%llu,%llu,%u,%u,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
              k->streamId, k->correlationId, k->name);
      break;
    }
    case CUPTI_ACTIVITY_KIND_DRIVER:
    case CUPTI_ACTIVITY_KIND_RUNTIME: {
      CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)record;
      const char *name = NULL;
      cuptiGetCallbackName(record->kind == CUPTI_ACTIVITY_KIND_DRIVER ? CUPTI_CB_DOMAIN_DRIVER_API
                                                                       : CUPTI_CB_DOMAIN_RUNTIME_API,
                           a->cbid, &name);
      fprintf(out, "A,%llu,%llu,%u,%u,%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
              a->threadId, a->correlationId, name ? name : "?");
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      MEMCPY_T *m = (MEMCPY_T *)record;
      fprintf(out, "M,%llu,%llu,%u,%u,%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
              m->streamId, m->correlationId, (unsigned long long)m->bytes);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      MEMSET_T *m = (MEMSET_T *)record;
      fprintf(out, "S,%llu,%llu,%u,%u,%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
              m->streamId, m->correlationId, (unsigned long long)m->bytes);
      break;
    }
    default:
      break;
    }
  }
  pthread_mutex_unlock(&lock);
  free(buffer);
}

static void flush_at_exit(void) {
  cuptiActivityFlushAll(1);
  if (out) fflush(out);
}

int InitializeInjection(void) {
  const char *path = getenv("CUPTI_TRACE_OUT");
  out = fopen(path ? path : "cupti-trace.csv", "w");
  if (!out) return 0;
  cuptiActivityRegisterCallbacks(requested, completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(flush_at_exit);
  return 1;
}
