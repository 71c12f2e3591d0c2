//! ECR registry host names, for every AWS partition: private registries
//! (`<account>.dkr.ecr[-fips].<region>.<partition domain>`, and the dual-stack
//! `<account>.dkr-ecr[-fips].<region>.on.aws`) and the public gallery `public.ecr.aws`. The
//! original's pattern (`\d{12}.dkr.ecr.\w+-\w+-\w+.amazonaws.com`) missed four-part regions such
//! as `us-gov-west-1` and every partition but two.

/// An ECR registry, parsed from its host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registry {
    /// A private registry of one account in one region.
    Private {
        /// The 12-digit account id.
        account: String,
        /// The region, e.g. `us-gov-west-1`.
        region: String,
        /// A FIPS endpoint (`dkr.ecr-fips`): the API calls use FIPS endpoints too.
        fips: bool,
        /// The ARN partition: `aws`, `aws-cn`, `aws-us-gov`, `aws-iso`, ...
        partition: &'static str,
    },
    /// `public.ecr.aws`: its token comes from the `ecr-public` API in `us-east-1`.
    Public,
}

/// The public gallery's host.
pub const PUBLIC_HOST: &str = "public.ecr.aws";

/// The region of the `ecr-public` API (and of its tokens).
pub const PUBLIC_REGION: &str = "us-east-1";

/// Partitions by region prefix, with the DNS suffix of their ECR endpoints (most specific first).
const PARTITIONS: [(&str, &str, &str); 7] = [
    ("us-gov-", "aws-us-gov", "amazonaws.com"),
    ("cn-", "aws-cn", "amazonaws.com.cn"),
    ("us-isob-", "aws-iso-b", "sc2s.sgov.gov"),
    ("us-isof-", "aws-iso-f", "csp.hci.ic.gov"),
    ("eu-isoe-", "aws-iso-e", "cloud.adc-e.uk"),
    ("us-iso-", "aws-iso", "c2s.ic.gov"),
    ("", "aws", "amazonaws.com"),
];

/// The ARN partition and DNS suffix of a region.
pub fn partition(region: &str) -> (&'static str, &'static str) {
    let (_, p, dns) = PARTITIONS.iter().find(|(prefix, _, _)| region.starts_with(prefix)).expect("catch-all");
    (p, dns)
}

/// Whether `region` is a region name: lowercase words joined by dashes, ending in a number
/// (`us-east-1`, `us-gov-west-1`, `eu-isoe-west-1`).
fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts.last().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The ECR registry a host (as written in an image reference) names, if it is one. A host with a
/// port is never ECR.
pub fn parse(host: &str) -> Option<Registry> {
    let host = host.to_ascii_lowercase();
    if host == PUBLIC_HOST {
        return Some(Registry::Public);
    }
    let (account, rest) = host.split_once('.')?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (service, rest) = rest.split_once('.')?;
    let (fips, rest, suffix_of) = match service {
        // `dkr.ecr.<region>.<partition domain>`
        "dkr" => match rest.split_once('.')? {
            ("ecr", rest) => (false, rest, None),
            ("ecr-fips", rest) => (true, rest, None),
            _ => return None,
        },
        // dual-stack: `dkr-ecr.<region>.on.aws`
        "dkr-ecr" => (false, rest, Some("on.aws")),
        "dkr-ecr-fips" => (true, rest, Some("on.aws")),
        _ => return None,
    };
    let (region, suffix) = rest.split_once('.')?;
    let want = suffix_of.unwrap_or_else(|| partition(region).1);
    (is_region(region) && suffix == want).then(|| private(account, region, fips))
}

fn private(account: &str, region: &str, fips: bool) -> Registry {
    Registry::Private {
        account: account.to_string(),
        region: region.to_string(),
        fips,
        partition: partition(region).0,
    }
}

/// Whether `host` is an ECR registry.
pub fn is_ecr(host: &str) -> bool {
    parse(host).is_some()
}

impl Registry {
    /// The region of its API.
    pub fn region(&self) -> &str {
        match self {
            Registry::Private { region, .. } => region,
            Registry::Public => PUBLIC_REGION,
        }
    }

    /// The ARN of `repository` (for public repositories, in `account`, which owns the alias).
    pub fn repository_arn(&self, repository: &str, account: &str) -> String {
        match self {
            Registry::Private { account, region, partition, .. } => {
                format!("arn:{partition}:ecr:{region}:{account}:repository/{repository}")
            }
            Registry::Public => {
                let name = repository.split_once('/').map_or(repository, |(_, name)| name);
                format!("arn:aws:ecr-public::{account}:repository/{name}")
            }
        }
    }

    /// The IAM service prefix of its actions.
    pub fn service(&self) -> &'static str {
        match self {
            Registry::Private { .. } => "ecr",
            Registry::Public => "ecr-public",
        }
    }
}

/// The account id in an IAM role ARN (`arn:<partition>:iam::<account>:role/<name>`).
pub fn role_account(role_arn: &str) -> Option<&str> {
    let mut parts = role_arn.split(':');
    let (arn, _partition, iam, _, account) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let resource = parts.next()?;
    (arn == "arn" && iam == "iam" && account.len() == 12 && resource.starts_with("role/")).then_some(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_and_four_part_regions() {
        let p = |h: &str| match parse(h) {
            Some(Registry::Private { account, region, fips, partition }) => {
                format!("{account} {region} {fips} {partition}")
            }
            other => format!("{other:?}"),
        };
        assert_eq!(p("123456789012.dkr.ecr.us-east-1.amazonaws.com"), "123456789012 us-east-1 false aws");
        assert_eq!(
            p("123456789012.dkr.ecr.us-gov-west-1.amazonaws.com"),
            "123456789012 us-gov-west-1 false aws-us-gov"
        );
        assert_eq!(
            p("123456789012.dkr.ecr-fips.us-gov-east-1.amazonaws.com"),
            "123456789012 us-gov-east-1 true aws-us-gov"
        );
        assert_eq!(p("123456789012.dkr.ecr-fips.us-east-2.amazonaws.com"), "123456789012 us-east-2 true aws");
        assert_eq!(
            p("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"),
            "123456789012 cn-north-1 false aws-cn"
        );
        assert_eq!(
            p("123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov"),
            "123456789012 us-iso-east-1 false aws-iso"
        );
        assert_eq!(
            p("123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov"),
            "123456789012 us-isob-east-1 false aws-iso-b"
        );
        assert_eq!(
            p("123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk"),
            "123456789012 eu-isoe-west-1 false aws-iso-e"
        );
        assert_eq!(
            p("123456789012.DKR.ECR.ap-southeast-2.amazonaws.com"),
            "123456789012 ap-southeast-2 false aws"
        );
        assert_eq!(p("123456789012.dkr-ecr.eu-west-1.on.aws"), "123456789012 eu-west-1 false aws");
        assert_eq!(p("123456789012.dkr-ecr-fips.us-east-1.on.aws"), "123456789012 us-east-1 true aws");
        assert_eq!(parse("public.ecr.aws"), Some(Registry::Public));
        for not in [
            "12345678901.dkr.ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com:443",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.test",
            "123456789012.dkr.ecr.useast1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-x.amazonaws.com",
            "x23456789012.dkr.ecr.us-east-1.amazonaws.com",
            "ghcr.io",
            "public.ecr.aws.evil.test",
        ] {
            assert_eq!(parse(not), None, "{not}");
        }
    }

    #[test]
    fn arns_carry_the_partition() {
        let r = parse("123456789012.dkr.ecr.us-gov-west-1.amazonaws.com").unwrap();
        assert_eq!(
            r.repository_arn("team/app", "ignored"),
            "arn:aws-us-gov:ecr:us-gov-west-1:123456789012:repository/team/app"
        );
        assert_eq!(
            Registry::Public.repository_arn("alias/app", "210987654321"),
            "arn:aws:ecr-public::210987654321:repository/app"
        );
        assert_eq!(role_account("arn:aws-cn:iam::123456789012:role/bob"), Some("123456789012"));
        assert_eq!(role_account("arn:aws:iam::123456789012:user/bob"), None);
    }
}
