function spm_features(ts_file, TR, out_dir)
% SPM_FEATURES  SPM12's data features of one ROI time series, without the inversion.
%
%   spm_features(ts_file, TR, out_dir) reads a T x n text time series, prepares it as
%   spm_dcm_fmri_csd does (detrend, scale to a standard deviation of 1/4) and writes the
%   cross-spectral density that spm_dcm_fmri_csd_data estimates (order-8 VB MAR model) into
%   out_dir with write_spm_csd: csd_data.txt and Hz.txt. Seconds where the full inversion
%   (run_spm_csd.m, which writes the same files) takes up to hours.
y = load(ts_file);
[T, n] = size(y);
DCM = struct();
DCM.a = ones(n); DCM.b = zeros(n, n, 0); DCM.c = zeros(n, 0); DCM.d = zeros(n, n, 0);
DCM.n = n; DCM.v = T;
DCM.Y.dt = TR;
DCM.U.u = zeros(T, 1); DCM.U.dt = TR; DCM.U.name = {'null'};
DCM.options = struct('nonlinear', 0, 'two_state', 0, 'stochastic', 0, 'centre', 0, ...
    'induced', 1, 'nograph', 1, 'maxnodes', 8, 'order', 8, 'maxit', 128, 'analysis', 'CSD');
yy = spm_detrend(y);
vY = spm_vec(yy);
DCM.Y.y = spm_unvec(vY / std(vY) / 4, yy);
DCM.M.p = DCM.options.order;
DCM.Y.p = DCM.options.order;
DCM = spm_dcm_fmri_csd_data(DCM);
write_spm_csd(DCM.Y.csd, DCM.Y.Hz, out_dir);
end
