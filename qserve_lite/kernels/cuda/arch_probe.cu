// Tells the loader's test whether NVRTC compiled this module for the arch-specific Hopper target.
extern "C" __device__ const int qs_arch_feature_sm90a =
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    1;
#else
    0;
#endif
