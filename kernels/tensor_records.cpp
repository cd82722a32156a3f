// Layout records of PyTorch tensors in one call, for the prepared path's check of new
// gradients and of parameters (gpuopt/tensor_records.py). Built against the running torch's
// own c10 headers and called through ctypes.PyDLL: the caller holds the GIL, so no tensor in
// its list can be freed meanwhile. Each address is a tensor's `_cdata`, its c10::TensorImpl.
#include <c10/core/TensorImpl.h>

#include <cstdint>

#define GPUOPT_RECORD_DIMS 8                           // sizes kept per record
#define GPUOPT_RECORD_WIDTH (6 + GPUOPT_RECORD_DIMS)  // = tensor_records.WIDTH

// The record of one tensor: data pointer, scalar type, device type, device index, contiguous,
// dimensions, then the sizes (0 past the last). A tensor this cannot describe (not dense and
// strided, no storage, more dimensions, or any accessor that throws) gets scalar type -1.
static void gpuopt_record(const long long impl, long long* r) {
    for (int k = 0; k < GPUOPT_RECORD_WIDTH; ++k) r[k] = 0;
    r[1] = -1;
    try {
        const c10::TensorImpl* t = reinterpret_cast<const c10::TensorImpl*>(impl);
        if (t->layout() != c10::kStrided || !t->has_storage() || t->dim() > GPUOPT_RECORD_DIMS) return;
        const c10::IntArrayRef sizes = t->sizes();
        const c10::Device device = t->device();
        r[0] = (long long)(std::intptr_t)t->data();
        r[2] = (long long)device.type();
        r[3] = device.index();
        r[4] = t->is_contiguous();
        r[5] = (long long)sizes.size();
        for (size_t d = 0; d < sizes.size(); ++d) r[6 + d] = sizes[d];
        r[1] = (long long)t->dtype().toScalarType();  // (last: valid only once all the rest is)
    } catch (...) {
        r[1] = -1;
    }
}

// The records of count tensors, one after another.
extern "C" int gpuopt_tensor_records(const long long* impls, const long long count, long long* records) {
    for (long long i = 0; i < count; ++i) gpuopt_record(impls[i], records + i * GPUOPT_RECORD_WIDTH);
    return 0;
}

// The data pointers of count tensors into pointers, as long as each record but its pointer
// equals the next row of expected (GPUOPT_RECORD_WIDTH - 1 values each, all valid); returns
// how many did (count: all of them).
extern "C" long long gpuopt_tensor_take(const long long* impls, const long long count, const long long* expected,
                                        long long* pointers) {
    long long r[GPUOPT_RECORD_WIDTH];
    for (long long i = 0; i < count; ++i) {
        gpuopt_record(impls[i], r);
        const long long* want = expected + i * (GPUOPT_RECORD_WIDTH - 1);
        for (int k = 1; k < GPUOPT_RECORD_WIDTH; ++k)
            if (r[k] != want[k - 1]) return i;
        pointers[i] = r[0];
    }
    return count;
}
